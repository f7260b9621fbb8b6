"""Hostile and clumsy input: no code runs from files, --force deletes only run folders, a NaN or diverged
model never ships, and every bad input is one line naming the problem and the fix (issue 18)."""
from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from typer.testing import CliRunner

from cifarpress.model_file import FORMAT, load_model, save_model
from cifarpress.utils.io import atomic_torch_save
from cifarpress.cli import app
from cifarpress.pipeline.compress import _read_done
from cifarpress.data import load_split
from cifarpress.datasets import dataset_spec
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import ExportCheckError, check_onnx, export_onnx
from cifarpress.runtime.onnx_file import read_onnx_metadata
from cifarpress.models import build_model, trusting
from cifarpress.train.ema import WeightEMA
from cifarpress.techniques.prune.dhspg import DhspgPruner
from cifarpress.techniques.prune.hesso import HessoPruner
from cifarpress.channels.budget import PruneTarget
from cifarpress.techniques.quantize.ternary import TernaryConfig
from cifarpress.techniques.quantize.qat import TernaryQAT
from cifarpress.pipeline.run_folder import MARKER, RunFolder, clean_stale_tmp
from cifarpress.train.trainer import Plugin, Trainer

from test_trainer import quick_config as quick, small_net, tiny  # noqa: F401 (tiny is a fixture)

SPEC = dataset_spec("cifar10")


def cli(*args: str, env: dict | None = None):
    result = CliRunner().invoke(app, list(args), env={"CIFARPRESS_NO_DOWNLOAD": "1", "COLUMNS": "300", **(env or {})})
    return result


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class Payload:
    """Unpickling this runs code: it creates the file named by `flag`."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


# -- 1. a resume file can hold data, never code -----------------------------------------------

def test_planted_resume_file_runs_no_code(tiny, tmp_path):
    train, _ = tiny
    flag = tmp_path / "payload-ran"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 1, "config": {}, "evil": Payload(flag)}, run / "last.pt")
    with pytest.raises(CifarpressError, match="not a checkpoint cifarpress will load"):
        Trainer(small_net(), quick(), run_dir=run, device=torch.device("cpu"), quiet=True).fit(train, None)
    assert not flag.exists()


def test_planted_resume_file_through_the_train_command(tiny_cifar_root, tmp_path):
    flag = tmp_path / "payload-ran"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"evil": Payload(flag)}, run / "last.pt")
    result = cli("train", "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "20", "--threads", "1",
                 "--out", str(run), "--data-root", str(tiny_cifar_root))
    one_line_error(result, "last.pt", "--force")
    assert not flag.exists()


@pytest.mark.parametrize("make", ["hesso", "dhspg", "ema", "ternary"])
def test_every_plugin_state_loads_weights_only(tiny, tmp_path, make):
    """Resume is weights-only, so every technique's checkpointed state must be plain data and tensors."""
    train, _ = tiny
    window = dict(start_fraction=0.0, end_fraction=1.0)
    plugin = {"hesso": lambda: HessoPruner(PruneTarget(sparsity=0.5), pruning_periods=2, saliency="fisher", **window),
              "dhspg": lambda: DhspgPruner(PruneTarget(sparsity=0.5), **window),
              "ema": lambda: WeightEMA(decay=0.9),
              "ternary": lambda: TernaryQAT(TernaryConfig())}[make]
    model = build_model("resnet20", 10)
    cfg = quick(epochs=2, max_steps_per_epoch=4)  # HESSO: two 4-step periods, a resume between them
    Trainer(model, cfg, [plugin()], run_dir=tmp_path, device=torch.device("cpu"), quiet=True).fit(train, None)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and "0:" + plugin().name in state["plugins"]
    again = Trainer(build_model("resnet20", 10), cfg, [plugin()], run_dir=tmp_path, device=torch.device("cpu"),
                    quiet=True).fit(train, None)
    assert again.resumed_from == 2


# -- 7. unreadable resume and stage files: one line, or redo that stage --------------------------

@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n", b"PK\x03\x04truncated"])
def test_unreadable_resume_file_is_one_line(tiny, tmp_path, content):
    train, _ = tiny
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(CifarpressError, match=r"last\.pt.*(empty|unreadable|not a).*delete"):
        Trainer(small_net(), quick(), run_dir=tmp_path, device=torch.device("cpu"), quiet=True).fit(train, None)


def test_truncated_resume_file_of_a_real_run(tiny, tmp_path):
    train, _ = tiny
    Trainer(small_net(), quick(epochs=2), run_dir=tmp_path, device=torch.device("cpu"), quiet=True).fit(train, None)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CifarpressError, match="unreadable"):
        Trainer(small_net(), quick(epochs=2), run_dir=tmp_path, device=torch.device("cpu"), quiet=True).fit(train, None)


def test_truncated_done_json_reruns_the_stage(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"key": "abc", "stage": "train"}))
    assert _read_done(good)["key"] == "abc"
    for text in ('{"key": "abc", "sta', "", "[1, 2]"):
        bad = tmp_path / "done.json"
        bad.write_text(text)
        assert _read_done(bad) is None


# -- 2. a model file may name only zoo architectures ---------------------------------------------

def _planted_model_file(path: Path, arch: str) -> Path:
    torch.save({"format": FORMAT, "arch": arch, "num_classes": 10, "dataset": "cifar10", "state_dict": {},
                "layers": {}, "meta": {}}, path)
    return path


@pytest.mark.parametrize("arch", ["os:abort", "tempfile:mkdtemp"])
def test_model_file_cannot_choose_a_function(tmp_path, monkeypatch, arch):
    called = []
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: called.append("mkdtemp"))
    monkeypatch.setattr("os.abort", lambda: called.append("abort"))
    path = _planted_model_file(tmp_path / "m.pt", arch)
    with pytest.raises(CifarpressError, match=rf"names the user factory '{arch}'.*--arch {arch}"):
        load_model(path)
    result = cli("eval", str(path))
    one_line_error(result, "model files may name only zoo architectures")
    assert called == []


def test_named_factory_loads_from_a_model_file(tmp_path, monkeypatch):
    (tmp_path / "userzoo.py").write_text(textwrap.dedent("""
        from torch import nn
        def make(num_classes=10):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("userzoo:make", 10)
    path = save_model(tmp_path / "m.pt", model, "userzoo:make", 10, "cifar10")
    with pytest.raises(CifarpressError, match="model files may name only zoo"):
        load_model(path)
    loaded, info = load_model(path, "userzoo:make")  # the user named it: --arch
    assert info["arch"] == "userzoo:make"
    with trusting("userzoo:make"):  # a recipe's model.arch
        load_model(path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


# -- 8. user model code that fails: one line naming the factory ----------------------------------

@pytest.mark.parametrize("source, arch, needle", [
    ("def make(num_classes=10):\n    raise RuntimeError('boom')\n", "badzoo_raise:make", "RuntimeError: boom"),
    ("def make(depth):\n    return None\n", "badzoo_arg:make", "TypeError"),
    ("def make(:\n", "badzoo_syntax:make", "SyntaxError"),
    ("import no_such_module_here\n", "badzoo_import:make", "cannot import"),
    ("raise ValueError('at import')\n", "badzoo_runs:make", "ValueError: at import"),
])
def test_failing_user_factory_is_one_line(tmp_path, monkeypatch, source, arch, needle):
    (tmp_path / f"{arch.split(':')[0]}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CifarpressError) as info:
        build_model(arch, 10)
    message = str(info.value)
    assert "\n" not in message and arch.split(":")[0] in message and needle in message
    result = cli("inspect", arch)
    one_line_error(result, needle)
    debug = cli("--debug", "inspect", arch)
    assert "Traceback" in debug.stderr  # --debug shows what went wrong inside the user's code


# -- 3. --force deletes only what cifarpress made -----------------------------------------------

def test_force_refuses_a_folder_cifarpress_did_not_make(tiny_cifar_root, tmp_path):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    result = cli("train", "--epochs", "1", "--max-steps-per-epoch", "1", "--force", "--out", str(mine),
                 "--data-root", str(tiny_cifar_root), "--threads", "1")
    one_line_error(result, "did not create it", "--out")
    assert (mine / "precious.txt").read_text() == "keep me"


def test_force_refuses_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / MARKER).touch()  # even a marked folder: never the cwd or above it
    for target in (".", str(tmp_path.parent)):
        with pytest.raises(CifarpressError, match="working directory"):
            with RunFolder(Path(target), force=True):
                pass
    assert (tmp_path / MARKER).exists()


def test_force_empties_a_run_folder_and_unknown_arch_deletes_nothing(tiny_cifar_root, tmp_path):
    run = tmp_path / "run"
    with RunFolder(run):
        (run / "old.txt").write_text("from an earlier run")
    assert (run / MARKER).exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{arch: resnet2000, checkpoint: builtin:resnet20-cifar10}}\n"
                      f"data_root: {tiny_cifar_root}\nstages:\n  - export: {{format: onnx}}\n")
    one_line_error(cli("compress", str(recipe), "--force", "--out", str(run)), "unknown model 'resnet2000'")
    assert (run / "old.txt").exists()  # validation failed before --force deleted anything
    with RunFolder(run, force=True):
        assert not (run / "old.txt").exists()
    assert (run / MARKER).exists()


# -- 12. one run per folder -------------------------------------------------------------------

def test_second_run_on_a_folder_in_use_is_refused(tmp_path):
    run = tmp_path / "run"
    with RunFolder(run, command="cifarpress compress first"):
        with pytest.raises(CifarpressError, match=rf"in use by process {os.getpid()} \(cifarpress compress first\)"):
            with RunFolder(run):
                pass
    with RunFolder(run):  # released when the first run ends
        pass


# -- 11. leftover temporary files are cleaned -----------------------------------------------------

def test_stale_temporary_files_are_removed(tmp_path):
    stale = tmp_path / "01-train" / ".last.pt.0123456789ab.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))
    fresh = tmp_path / ".model.onnx.fedcba987654.tmp"  # a write in progress right now: kept
    fresh.write_bytes(b"")
    assert clean_stale_tmp(tmp_path) == 1
    assert not stale.exists() and fresh.exists()
    os.utime(fresh, (0, 0))
    with RunFolder(tmp_path):
        assert not fresh.exists()


# -- 4 and 5. a NaN or diverged model never ships -------------------------------------------------

def test_nan_model_fails_the_parity_check(tiny, tmp_path):
    _, test = tiny
    model = small_net().eval()
    with torch.no_grad():
        model[5].weight.fill_(float("nan"))
    path = export_onnx(model, tmp_path / "nan.onnx", SPEC, test.classes)
    with pytest.raises(ExportCheckError, match="NaN or infinite values.*model.5.weight.*learning rate"):
        check_onnx(model, path, test, 100)

    class NanLogits(nn.Module):  # finite weights, NaN outputs
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            return self.fc(x.mean((2, 3))) + (-(x.abs() + 1)).sqrt().mean((1, 2, 3))[:, None]

    model = NanLogits().eval()
    path = export_onnx(model, tmp_path / "nan-logits.onnx", SPEC, test.classes)
    for tolerance in (1e-4, float("inf")):  # even where the tolerance is infinite (int8 checks)
        with pytest.raises(ExportCheckError, match="PyTorch gives NaN or infinite logits on 100 of 100"):
            check_onnx(model, path, test, 100, tolerance=tolerance)


def test_nan_model_file_does_not_export(tiny_cifar_root, tmp_path):
    model = small_net()
    with torch.no_grad():
        model[1].running_var.fill_(float("inf"))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "userzoo_nan.py").write_text(textwrap.dedent("""
        from torch import nn
        def make(num_classes=10):
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        result = cli("export", str(tmp_path / "sd.pt"), "--arch", "userzoo_nan:make", "-o", str(tmp_path / "m.onnx"),
                     "--data-root", str(tiny_cifar_root), "--check-images", "20")
    finally:
        sys.path.remove(str(tmp_path))
    one_line_error(result, "NaN or infinite values", "running_var", "learning rate")
    assert not (tmp_path / "m.onnx").exists()
    assert not list(tmp_path.glob(".*unchecked*"))


class BlowUpStatistics(Plugin):
    """What lr 1000 does in a few steps: the loss stays finite while BatchNorm variances overflow."""

    name = "blow-up"

    def after_step(self, trainer):
        trainer.model[1].running_var.fill_(float("inf"))


def test_diverged_training_stops_the_stage_without_saving(tiny, tmp_path):
    train, test = tiny
    with pytest.raises(CifarpressError, match=r"training diverged at epoch 1.*running_var.*lower the learning rate"):
        Trainer(small_net(), quick(), [BlowUpStatistics()], run_dir=tmp_path, device=torch.device("cpu"),
                quiet=True).fit(train, test)
    assert not (tmp_path / "last.pt").exists()  # the diverged epoch is not kept for a resume


def test_real_divergence_at_a_huge_learning_rate(tiny):
    train, test = tiny
    torch.manual_seed(0)
    with pytest.raises(CifarpressError, match="diverged"):
        Trainer(build_model("resnet20", 10), quick(lr=1e4, max_steps_per_epoch=4, epochs=2),
                device=torch.device("cpu"), quiet=True).fit(train, test)


# -- 6. --tolerance applies to quantized exports, and a failed check publishes nothing -----------

def test_quantized_export_honours_tolerance_and_publishes_only_after_the_check(tiny_cifar_root, tmp_path):
    from cifarpress.techniques.quantize.ternary import quantize_model

    model = build_model("resnet20", 10)
    quantize_model(model, TernaryConfig())
    source = save_model(tmp_path / "t.pt", model, "resnet20", 10, "cifar10")
    target = tmp_path / "t.onnx"
    target.write_bytes(b"an earlier export")
    result = cli("export", str(source), "-o", str(target), "--tolerance", "1e-30", "--check-images", "20",
                 "--data-root", str(tiny_cifar_root))
    one_line_error(result, f"{target} differs from the PyTorch", "not faithful")
    assert target.read_bytes() == b"an earlier export"  # the unfaithful file never replaced it
    ok = cli("export", str(source), "-o", str(target), "--check-images", "20", "--data-root", str(tiny_cifar_root))
    assert ok.exit_code == 0, ok.output + ok.stderr
    assert read_onnx_metadata(target)["dataset"] == "cifar10"


# -- 9. paths that cannot be written --------------------------------------------------------------

def test_out_onto_a_file_and_too_long_a_name(tiny_cifar_root, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    base = ["train", "--epochs", "1", "--max-steps-per-epoch", "1", "--data-root", str(tiny_cifar_root),
            "--threads", "1"]
    one_line_error(cli(*base, "--out", str(a_file)), "is a file", "--out")
    one_line_error(cli(*base, "--out", str(tmp_path / ("x" * 300))), "too long")
    one_line_error(cli(*base, "--out", str(a_file / "run")), "--out")


def test_recipe_name_too_long_is_a_validation_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {'n' * 300}\nmodel: {{arch: resnet20}}\nstages:\n  - train: {{epochs: 1}}\n")
    one_line_error(cli("compress", str(recipe)), "name")


def test_bench_json_destination_is_checked_before_measuring(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx", (3, 32, 32))
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    result = cli("bench", str(model), "--no-accuracy", "--json", str(blocked / "out.json"), "-b", "1")
    one_line_error(result, "cannot write", "--json")
    assert "p50" not in result.stdout  # nothing was measured and lost


# -- 10 and 11. ONNX files that do not fit, empty files, folders -----------------------------------

def tiny_onnx(path: Path, image_shape: tuple[int, int, int]) -> Path:
    """A valid cifarpress-like ONNX classifier (global pooling + a 3x10 matmul) for any input shape."""
    c = image_shape[0]
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *image_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor("w", TensorProto.FLOAT, [c, 10], np.ones((c, 10), np.float32).ravel())])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    entry = proto.metadata_props.add()
    entry.key, entry.value = "dataset", "cifar10"
    onnx.save(proto, path)
    return path


def test_onnx_of_another_input_shape_names_both_shapes(tiny_cifar_root, tmp_path):
    model = tiny_onnx(tmp_path / "big.onnx", (3, 64, 64))
    one_line_error(cli("eval", str(model), "--data-root", str(tiny_cifar_root)), "Nx3x64x64", "Nx3x32x32")
    one_line_error(cli("bench", str(model), "-b", "1", "--seconds", "0.05", "--data-root", str(tiny_cifar_root)),
                   "Nx3x64x64")
    timed = cli("bench", str(model), "-b", "1", "--seconds", "0.05", "--no-accuracy",
                "--json", str(tmp_path / "b.json"))
    assert timed.exit_code == 0, timed.stderr  # latency alone runs at the file's own shape
    assert json.loads((tmp_path / "b.json").read_text())["latency_ms"]["1"]["p50"] > 0


def test_empty_files_and_folders_are_named_as_such(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    one_line_error(cli("lower", str(empty)), "empty or not an ONNX model")
    folder = tmp_path / "models.onnx"
    folder.mkdir()
    one_line_error(cli("eval", str(folder)), "is a folder")
    one_line_error(cli("bench", str(folder)), "is a folder")
    one_line_error(cli("export", str(tmp_path)), "is a folder")
    (tmp_path / "empty.pt").write_bytes(b"")
    one_line_error(cli("eval", str(tmp_path / "empty.pt")), "empty")


def test_pickled_code_in_a_model_file_is_named(tmp_path):
    flag = tmp_path / "ran"
    torch.save({"format": FORMAT, "arch": "resnet20", "obj": Payload(flag)}, tmp_path / "m.pt")
    one_line_error(cli("eval", str(tmp_path / "m.pt")), "Python objects beyond tensors", "state_dict")
    assert not flag.exists()
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump(small_net(), f)
    with pytest.raises(CifarpressError, match="state dict"):
        load_model(tmp_path / "pickled.pt")


def test_atomic_save_leaves_no_tmp_on_failure(tmp_path):
    class Unsavable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Unsavable()}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_planted_data_batch_runs_no_code(tiny_cifar_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_cifar_root, root)
    flag = tmp_path / "ran"
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0], b"data": Payload(flag)}, f)
    with pytest.raises(CifarpressError, match="test_batch.*pathlib"):
        load_split("cifar10", "test", root, download_if_missing=False)
    assert not flag.exists()


def test_out_in_a_read_only_folder_is_one_line(tiny_cifar_root, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # as in a folder without write permission (root ignores chmod)
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = cli("train", "--epochs", "1", "--max-steps-per-epoch", "1", "--data-root", str(tiny_cifar_root),
                 "--threads", "1", "--out", str(tmp_path / "ro" / "run"))
    one_line_error(result, "cannot create the run folder", "Permission denied", "--out")
