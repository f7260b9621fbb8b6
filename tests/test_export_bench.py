"""ONNX export (opset, dynamic batch, in-graph normalization, metadata, check, atomic write), bench and their CLI."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import cifarpress.runtime.latency as bench_module
from cifarpress.runtime.latency import interleaved_latency, measure_latency
from cifarpress.runtime.ort import onnx_accuracy
from cifarpress.model_file import save_model
from cifarpress.cli import app
from cifarpress.data import dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import ExportCheckError, check_onnx, export_onnx
from cifarpress.runtime.onnx_file import read_onnx_metadata
from cifarpress.models import build_model
from cifarpress.profile import human
from cifarpress.train.trainer import evaluate

from conftest import CLASSES

CLI = [sys.executable, "-m", "cifarpress.cli"]
SPEC = dataset_spec("cifar10")


@pytest.fixture(scope="module")
def tiny_test(tiny_cifar_root):
    return load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_test):
    """A random-init ResNet-20 in eval mode, its model file and its ONNX export."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    folder = tmp_path_factory.mktemp("export")
    pt = save_model(folder / "model.pt", model, "resnet20", 10, "cifar10")
    onnx_path = export_onnx(model, folder / "model.onnx", SPEC, tiny_test.classes, {"arch": "resnet20"})
    return model, pt, onnx_path


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_onnx_opset_and_dynamic_batch(exported, tiny_test):
    model, _, path = exported
    proto = onnx.load(str(path))
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets.get("", opsets.get("ai.onnx", 0)) >= 17
    (inp,) = proto.graph.input
    assert inp.name == "input"
    assert proto.graph.output[0].name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    sess = session(path)
    for batch in (1, 7):
        x = tiny_test.images[:batch].float().numpy() / 255.0
        (logits,) = sess.run(["logits"], {"input": x})
        assert logits.shape == (batch, 10)


def test_onnx_takes_pixels_in_0_1_and_normalizes_inside(exported, tiny_test):
    model, _, path = exported
    x = tiny_test.images[:7].float() / 255.0
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model((x - mean) / std).numpy()
    (got,) = session(path).run(["logits"], {"input": x.numpy()})
    assert np.abs(got - ref).max() <= 1e-4
    assert not model.training  # export leaves the model's mode as it was


def test_onnx_metadata(exported):
    _, _, path = exported
    meta = read_onnx_metadata(path)
    assert meta["dataset"] == "cifar10"
    assert meta["classes"] == CLASSES and len(meta["classes"]) == 10
    pre = json.loads(meta["preprocessing"])
    assert pre["mean"] == pytest.approx(list(SPEC.mean)) and pre["std"] == pytest.approx(list(SPEC.std))
    assert "[0, 1]" in meta["input"]
    assert meta["arch"] == "resnet20"


def test_check_onnx_passes_when_faithful_and_fails_when_not(exported, tiny_test):
    model, _, path = exported
    check = check_onnx(model, path, tiny_test, images=1000, tolerance=1e-4, threads=1)
    assert check.images == len(tiny_test) == 100
    assert check.max_abs_diff <= 1e-4 and check.top1_agreement == 100.0

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc.weight.add_(0.5)  # the file no longer matches the model
    with pytest.raises(ExportCheckError, match="differs from PyTorch") as info:
        check_onnx(changed, path, tiny_test, images=50, tolerance=1e-4, threads=1)
    assert isinstance(info.value, CifarpressError)

    changed.train()
    check_onnx(changed, path, tiny_test, images=20, tolerance=10.0, threads=1)
    assert changed.training  # the caller's mode is left as it was


def test_export_is_atomic(tmp_path, exported, tiny_test):
    _, pt, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.pt"]  # no temp files left
    out = tmp_path / "m.onnx"
    out.write_bytes(path.read_bytes())
    before = out.read_bytes()

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace me")

    # a failed export over an existing file leaves it untouched and no temp file behind
    with pytest.raises(CifarpressError, match="ONNX export failed"):
        export_onnx(Broken(), out, SPEC, tiny_test.classes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert out.read_bytes() == before


def test_measure_latency(exported):
    _, _, path = exported
    result = measure_latency(path, batch_sizes=(1, 4), threads=1, seconds=0.2)
    assert set(result["latency_ms"]) == {"1", "4"}
    for lat in result["latency_ms"].values():
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert lat["throughput_ips"] > 0
    assert result["peak_rss_bytes"] > 0
    assert result["threads"] == 1 and result["onnxruntime"] == ort.__version__


def test_interleaved_latency_alternates_files_and_takes_the_median(monkeypatch):
    calls = []
    fake_ms = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0])}

    def fake_measure(path, batch_sizes, threads, seconds, lower=True):
        calls.append((path, lower))
        ms = next(fake_ms[path])
        return {"latency_ms": {str(b): {"p50": ms * b} for b in batch_sizes}, "onnxruntime": "x"}

    monkeypatch.setattr(bench_module, "measure_latency", fake_measure)
    result = interleaved_latency({"A": "a", "B": "b"}, (1, 64), threads=1, seconds=0.1, rounds=3, as_written={"B"})
    assert calls == [("a", True), ("b", False)] * 3  # each round visits every file once, in turn
    assert result["p50"] == {"A": {"1": 3.0, "64": 192.0}, "B": {"1": 4.0, "64": 256.0}}
    assert [r["1"] for r in result["rounds"]["B"]] == [2.0, 9.0, 4.0]


def test_onnx_accuracy_matches_pytorch(exported, tiny_test):
    model, _, path = exported
    assert onnx_accuracy(path, tiny_test, threads=1, batch=32) == pytest.approx(evaluate(model, tiny_test), abs=1e-9)


# -- command line ---------------------------------------------------------------------------------

def cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CIFARPRESS_NO_DOWNLOAD="1", COLUMNS="200")
    env.pop("CIFARPRESS_DATA", None)
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_bench_missing_file(tmp_path):
    proc = cli(["bench", str(tmp_path / "missing.onnx"), "--threads", "1"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.onnx" in lines[0], proc.stderr


def test_cli_bench_writes_json(tmp_path, exported, tiny_cifar_root):
    _, _, source = exported
    path = tmp_path / "m.onnx"
    path.write_bytes(source.read_bytes())
    proc = cli(["bench", str(path), "-b", "1", "-b", "2", "--threads", "1", "--seconds", "0.1",
                "--data-root", str(tiny_cifar_root)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "m.bench.json").read_text())
    for key in ("model", "onnx_bytes", "dataset", "latency_ms", "peak_rss_bytes", "threads", "onnxruntime",
                "top1", "machine"):
        assert key in result, key
    assert result["onnx_bytes"] == path.stat().st_size and result["dataset"] == "cifar10"
    assert result["threads"] == 1 and 0.0 <= result["top1"] <= 100.0
    assert set(result["latency_ms"]) == {"1", "2"}
    for lat in result["latency_ms"].values():
        assert {"p50", "p90", "p99", "throughput_ips"} <= set(lat)
        assert lat["p50"] <= lat["p90"] <= lat["p99"]
    assert {"cpu", "cores"} <= set(result["machine"])


def test_cli_compare_times_files_in_turn_and_gives_ratios_to_the_first(tmp_path, exported, tiny_cifar_root):
    model, _, source = exported
    smaller = copy.deepcopy(model)
    smaller.layer3 = nn.Identity()  # a genuinely different graph: fewer layers, smaller file
    smaller.fc = nn.Linear(32, 10)
    small_path = export_onnx(smaller, tmp_path / "small.onnx", SPEC, CLASSES, {"arch": "resnet20"})
    out = tmp_path / "cmp.json"
    proc = cli(["compare", str(source), str(small_path), "-b", "1", "-b", "4", "--threads", "1", "--seconds", "0.1",
                "--rounds", "2", "--data-root", str(tiny_cifar_root), "--json", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    ref, other = result["models"]
    assert ref["model"] == str(source) and other["model"] == str(small_path)
    assert ref["size_vs_first"] == 1.0 and ref["latency_vs_first"] == {"1": 1.0, "4": 1.0}
    assert other["size_vs_first"] == pytest.approx(small_path.stat().st_size / source.stat().st_size)
    assert other["size_vs_first"] < 1.0
    assert other["latency_vs_first"]["4"] == pytest.approx(other["latency_ms_p50"]["4"] / ref["latency_ms_p50"]["4"])
    assert len(other["latency_rounds"]) == 2 and result["threads"] == 1
    assert 0.0 <= other["top1"] <= 100.0 and other["top1_delta_pp"] == pytest.approx(other["top1"] - ref["top1"])


@pytest.mark.parametrize("case, needle", [("one", "two or more"), ("missing", "not found"), ("pt", "not an .onnx")])
def test_cli_compare_bad_input_is_one_line(tmp_path, exported, case, needle):
    _, pt, source = exported
    other = {"one": [], "missing": [str(tmp_path / "nope.onnx")], "pt": [str(pt)]}[case]
    proc = cli(["compare", str(source), *other, "--threads", "1", "--no-accuracy"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def test_cli_inspect():
    # in-process (the command's own code, no interpreter start-up): JSON, and a table with the same totals
    runner = CliRunner()
    as_json = runner.invoke(app, ["inspect", "resnet20", "--json"], env={"COLUMNS": "40"})
    assert as_json.exit_code == 0, as_json.output
    prof = json.loads(as_json.stdout)
    assert prof["params"] == 272474
    assert prof["macs"] > 40_000_000 and len(prof["layers"]) > 20
    table = runner.invoke(app, ["inspect", "resnet20"], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    total = [line for line in table.output.splitlines() if "total" in line]
    assert len(total) == 1, table.output
    assert human(prof["params"]) in total[0] and human(prof["macs"]) in total[0], total[0]


def test_cli_eval_onnx_and_pt_agree(exported, tiny_cifar_root):
    _, pt, path = exported
    results = []
    for target in (pt, path):
        proc = CliRunner().invoke(app, ["eval", str(target), "--data-root", str(tiny_cifar_root), "--threads", "1"])
        assert proc.exit_code == 0, proc.output
        results.append(json.loads(proc.stdout.strip().splitlines()[-1])["top1"])
    assert results[0] == results[1]


def test_cli_help():
    proc = cli(["--help"])  # the real entry point
    assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stderr
    runner = CliRunner()
    for command in ("train", "eval", "compress", "export", "bench", "compare", "inspect"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output, command


def test_atomic_write_gives_the_file_the_mode_a_plain_write_would(tmp_path):
    # mkstemp creates 0600 files; a shared ONNX or report must not end up readable by its owner only
    from cifarpress.utils.io import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (atomic.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    old = os.umask(0o027)
    try:
        assert (atomic_write_text(tmp_path / "masked.txt", "x").stat().st_mode & 0o777) == 0o640
    finally:
        os.umask(old)


def test_bench_worker_peak_memory_is_the_models_not_the_parents():
    """The worker's peak RSS must not depend on who launched it: ru_maxrss survives fork+exec on Linux, so
    a worker started from a large process (a recipe run) used to report that process's peak."""
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "bench" / "results" / "resnet20-fp32.onnx"
    args = [str(model), "--batches", "1", "--threads", "1", "--seconds", "0.1", "--warmup", "2"]
    ballast = np.ones(800 * 2**20 // 8)  # this process grows by 800 MB, as a compress run does
    ballast[::512] += 1  # touched, so resident
    inside = measure_latency(model, (1,), threads=1, seconds=0.1, warmup=2, lower=False)["peak_rss_bytes"]
    del ballast
    # From a shell: the worker's parent is a small `sh`, not this process.
    command = " ".join([sys.executable, "-m", "cifarpress.runtime.worker", *args])
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120)
    shell = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    assert abs(inside - shell) <= 0.10 * shell, (inside, shell)
    assert shell < 400 * 2**20  # onnxruntime and a 1 MB model, far from the 800 MB ballast
