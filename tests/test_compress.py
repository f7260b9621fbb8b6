"""`run_recipe` on the tiny data: report shape, stage folders, resume after an interruption, skip, rerun, --force."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cifarpress.pipeline.training
from cifarpress.model_file import load_model, save_model
from cifarpress.pipeline.compress import RunContext, _baseline, run_recipe
from cifarpress.errors import CifarpressError
from cifarpress.runtime.onnx_file import read_onnx_metadata
from cifarpress.models import build_model
from cifarpress.pipeline.recipe import load_recipe

STAGES = ["00-baseline", "01-train", "02-export"]


def recipe_text(data_root: Path, tolerance: float | None = None, dataset: str = "cifar10",
                checkpoint: str = "start.pt", batch_sizes: str = "[1, 4]") -> str:
    export = "{}" if tolerance is None else f"{{tolerance: {tolerance}}}"
    return (f"name: tiny\ndataset: {dataset}\ndata_root: {data_root}\n"
            f"model: {{arch: resnet20, checkpoint: {checkpoint}}}\n"
            "stages:\n"
            "  - train: {epochs: 1, max_steps_per_epoch: 2, batch_size: 32, lr: 0.05}\n"
            f"  - export: {export}\n"
            f"bench: {{batch_sizes: {batch_sizes}, seconds: 0.1, threads: 1, rounds: 2}}\n")


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def stamps(run_dir: Path) -> dict[str, int]:
    """mtime (ns) of every stage's done.json."""
    return {d.name: (d / "done.json").stat().st_mtime_ns for d in sorted(run_dir.glob("[0-9][0-9]-*"))
            if (d / "done.json").exists()}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_cifar_root):
    folder = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    save_model(folder / "start.pt", build_model("resnet20", 10), "resnet20", 10, "cifar10", {"source": "test"})
    write_recipe(folder, recipe_text(tiny_cifar_root))
    return folder


@pytest.fixture(scope="module")
def finished_run(project):
    """A run interrupted (Ctrl-C) in the train stage after the baseline finished, then resumed to the end."""
    torch.set_num_threads(1)
    run_dir = project / "run"
    recipe = load_recipe(project / "recipe.yaml")

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cifarpress.pipeline.training, "run_training", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe, run_dir)
    after_interrupt = stamps(run_dir)
    baseline_model = (run_dir / "00-baseline" / "model.pt").stat().st_mtime_ns
    folders = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    assert not (run_dir / "report.json").exists()

    assert run_recipe(load_recipe(project / "recipe.yaml"), run_dir) == run_dir
    return {"dir": run_dir, "after_interrupt": after_interrupt, "folders_after_interrupt": folders,
            "baseline_model_mtime": baseline_model}


def test_interrupted_run_resumes_without_redoing_the_baseline(finished_run):
    run_dir = finished_run["dir"]
    assert list(finished_run["after_interrupt"]) == ["00-baseline"]  # train had started, not finished
    assert finished_run["folders_after_interrupt"] == ["00-baseline", "01-train"]
    now = stamps(run_dir)
    assert list(now) == STAGES
    assert now["00-baseline"] == finished_run["after_interrupt"]["00-baseline"]
    assert (run_dir / "00-baseline" / "model.pt").stat().st_mtime_ns == finished_run["baseline_model_mtime"]


def test_report_shape_and_stage_folders(finished_run, tiny_cifar_root):
    run_dir = finished_run["dir"]
    for name in STAGES:
        assert (run_dir / name / "metrics.json").is_file() and (run_dir / name / "done.json").is_file()
    for name in STAGES[:2]:
        assert (run_dir / name / "model.pt").is_file() and (run_dir / name / "model.onnx").is_file()
    assert not list(run_dir.rglob("*.tmp"))

    report = json.loads((run_dir / "report.json").read_text())
    assert {"stages", "deployable", "machine", "recipe", "dataset"} <= set(report)
    assert report["recipe"] == "tiny" and report["dataset"] == "cifar10"
    assert {"cpu", "cores", "simd", "int8_kernels", "versions"} <= set(report["machine"])
    assert {"created", "recipe_sha256", "versions"} <= set(report["provenance"])
    assert report["provenance"]["versions"]["onnxruntime"] and "images" in report["test_set"]
    rows = report["stages"]
    assert [r["stage"] for r in rows] == ["baseline", "train"]  # one row per model; export publishes
    for row in rows:
        assert isinstance(row["top1"], float) and 0.0 <= row["top1"] <= 100.0
        assert row["params"] == 272474 and isinstance(row["macs"], int) and row["macs"] > 0
        assert isinstance(row["onnx_bytes"], int) and row["onnx_bytes"] > 0
        assert set(row["latency_ms"]) == {"1", "4"}
        assert row["latency_rounds"] == 2
        for lat in row["latency_ms"].values():
            # p50: the median of the interleaved rounds, inside their range; p90/p99: the stage's own run
            assert 0 < lat["p50_range"][0] <= lat["p50"] <= lat["p50_range"][1] and lat["p90"] <= lat["p99"]
        ratios = row["ratios"]
        assert {"params", "macs", "onnx_bytes", "latency_p50_b1", "latency_p50_b4", "top1_delta_pp"} <= set(ratios)
        assert row["onnx_check"]["max_abs_diff"] <= 1e-4
    first = rows[0]["ratios"]
    assert all(first[k] == 1.0 for k in ("params", "macs", "onnx_bytes", "latency_p50_b1", "latency_p50_b4"))
    assert first["top1_delta_pp"] == 0.0
    assert rows[1]["ratios"]["top1_delta_pp"] == pytest.approx(rows[1]["top1"] - rows[0]["top1"])

    deployable = report["deployable"]
    assert deployable["format"] == "onnx" and deployable["bytes"] > 0
    assert Path(deployable["artifact"]) == run_dir / "02-export" / "model.onnx"
    assert Path(deployable["artifact"]).stat().st_size == deployable["bytes"]
    assert Path(deployable["source_model"]) == run_dir / "01-train" / "model.pt"
    assert read_onnx_metadata(deployable["artifact"])["stage"] == "02-export"
    assert deployable["onnx_check"]["images"] == 100

    md = (run_dir / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| stage |")
    assert [line.split("|")[1].strip() for line in table[1:]] == ["baseline", "train"]
    assert "02-export/model.onnx" in md


def test_rerun_skips_every_stage(finished_run, project, capsys):
    run_dir = finished_run["dir"]
    before, report_before = stamps(run_dir), json.loads((run_dir / "report.json").read_text())
    capsys.readouterr()
    run_recipe(load_recipe(project / "recipe.yaml"), run_dir)
    err = capsys.readouterr().err
    for name in STAGES:
        assert f"{name}: done earlier, skipped" in err
    assert stamps(run_dir) == before
    assert json.loads((run_dir / "report.json").read_text()) == report_before

    # the same through the command line
    env = dict(os.environ, OMP_NUM_THREADS="1", CIFARPRESS_NO_DOWNLOAD="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "cifarpress.cli", "compress", str(project / "recipe.yaml"),
                           "--out", str(run_dir), "--threads", "1"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("done earlier, skipped") == 3
    assert "| baseline |" in proc.stdout and f"report: {run_dir / 'report.json'}" in proc.stdout
    assert stamps(run_dir) == before


def test_changed_export_stage_reruns_only_it(finished_run, project, tiny_cifar_root):
    run_dir = finished_run["dir"]
    before = stamps(run_dir)
    models = {n: (run_dir / n / "model.pt").stat().st_mtime_ns for n in STAGES[:2]}
    changed = project / "changed"
    changed.mkdir()
    # the same checkpoint as before (by its resolved path), so only the export stage differs
    text = recipe_text(tiny_cifar_root, tolerance=1e-3, checkpoint=str((project / "start.pt").resolve()))
    run_recipe(load_recipe(write_recipe(changed, text)), run_dir)
    after = stamps(run_dir)
    assert after["00-baseline"] == before["00-baseline"] and after["01-train"] == before["01-train"]
    assert after["02-export"] > before["02-export"]
    assert {n: (run_dir / n / "model.pt").stat().st_mtime_ns for n in STAGES[:2]} == models
    assert json.loads((run_dir / "02-export" / "done.json").read_text())["artifact"]["onnx_check"]["images"] == 100


def test_changed_bench_measures_again_without_training_again(finished_run, project, tiny_cifar_root):
    run_dir = finished_run["dir"]
    files = [run_dir / "00-baseline" / "model.pt", run_dir / "01-train" / "model.pt", run_dir / "01-train" / "last.pt"]
    before = [f.stat().st_mtime_ns for f in files]
    changed = project / "bench-changed"
    changed.mkdir()
    text = recipe_text(tiny_cifar_root, tolerance=1e-3, checkpoint=str((project / "start.pt").resolve()),
                       batch_sizes="[1, 2]")
    run_recipe(load_recipe(write_recipe(changed, text)), run_dir)
    assert [f.stat().st_mtime_ns for f in files] == before  # measured again, not trained again
    report = json.loads((run_dir / "report.json").read_text())
    for row in report["stages"]:
        assert set(row["latency_ms"]) == {"1", "2"}
        assert {"latency_p50_b1", "latency_p50_b2"} <= set(row["ratios"])
    for name in STAGES[:2]:
        assert set(json.loads((run_dir / name / "metrics.json").read_text())["latency_ms"]) == {"1", "2"}
    assert "p50 ms b2" in (run_dir / "report.md").read_text()


def test_force_reruns_everything(finished_run, project):
    run_dir = finished_run["dir"]
    before = stamps(run_dir)
    run_recipe(load_recipe(project / "recipe.yaml"), run_dir, force=True)
    after = stamps(run_dir)
    assert list(after) == STAGES
    assert all(after[n] > before[n] for n in STAGES)
    assert json.loads((run_dir / "report.json").read_text())["stages"][0]["ratios"]["params"] == 1.0


def test_missing_dataset_fails_before_any_stage(project, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARPRESS_NO_DOWNLOAD", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = load_recipe(project / "recipe.yaml")
    out = tmp_path / "run"
    with pytest.raises(CifarpressError, match="cifar10 not found") as info:
        run_recipe(recipe, out, data_root=str(empty))
    assert str(empty) in str(info.value)
    assert not out.exists() or not list(out.glob("[0-9][0-9]-*"))

    # --force with the data missing must not delete the previous run
    (out / "00-baseline").mkdir(parents=True, exist_ok=True)
    (out / "00-baseline" / "done.json").write_text("{}")
    with pytest.raises(CifarpressError):
        run_recipe(recipe, out, data_root=str(empty), force=True)
    assert (out / "00-baseline" / "done.json").read_text() == "{}"


def test_checkpoint_with_other_class_count(tmp_path, tiny_cifar_root):
    save_model(tmp_path / "c100.pt", build_model("resnet20", 100), "resnet20", 100, "cifar100")
    recipe = load_recipe(write_recipe(tmp_path, recipe_text(tiny_cifar_root, checkpoint="c100.pt")))
    with pytest.raises(CifarpressError, match="100 outputs") as info:
        run_recipe(recipe, tmp_path / "run")
    assert "cifar10 has 10 classes" in str(info.value)
    assert not list((tmp_path / "run").rglob("done.json"))


def test_plain_state_dict_checkpoint_gets_the_dataset_class_count(tmp_path):
    torch.save(build_model("resnet20", 100).state_dict(), tmp_path / "plain.pt")
    text = "name: c100\ndataset: cifar100\nmodel: {arch: resnet20, checkpoint: plain.pt}\nstages: [export]\n"
    recipe = load_recipe(write_recipe(tmp_path, text))
    ctx = RunContext(recipe, tmp_path / "run", None)
    _, info = load_model(_baseline(ctx, tmp_path / "run" / "00-baseline"))
    assert info["num_classes"] == 100 and info["dataset"] == "cifar100"


def test_int8_export_stage_is_a_measured_report_row(tmp_path, tiny_cifar_root):
    from cifarpress.export.int8 import check_int8_rules

    torch.manual_seed(0)
    save_model(tmp_path / "start.pt", build_model("resnet20", 10), "resnet20", 10, "cifar10", {"source": "test"})
    text = (f"name: int8\ndata_root: {tiny_cifar_root}\nmodel: {{arch: resnet20, checkpoint: start.pt}}\n"
            "stages:\n  - export: {precision: int8, calibrator: minmax, calib_images: 40, check_images: 20}\n"
            "bench: {batch_sizes: [1, 4], seconds: 0.1, threads: 1}\n")
    recipe = load_recipe(write_recipe(tmp_path, text))
    report = json.loads((run_recipe(recipe, tmp_path / "run") / "report.json").read_text())
    baseline, int8 = report["stages"]
    assert int8["stage"] == "export-int8" and int8["calibrator"] == "minmax" and int8["calib_images"] == 40
    assert int8["ratios"]["onnx_bytes"] < 0.4  # int8 weights: about a quarter of fp32, plus scales and graph
    assert int8["onnx_check"]["images"] == 20 and int8["top1_torch"] == baseline["top1_torch"]
    assert report["deployable"]["artifact"] == int8["onnx"] and check_int8_rules(int8["onnx"]) == []
    assert "float model in PyTorch" in (tmp_path / "run" / "report.md").read_text()
    assert int8["onnxruntime_lowering"]["relu_chains"] > 0 and not any(baseline["onnxruntime_lowering"].values())
    assert "- export-int8: timed as cifarpress runs QDQ graphs" in (tmp_path / "run" / "report.md").read_text()
    before = stamps(tmp_path / "run")
    run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run")  # finished: nothing runs again
    assert stamps(tmp_path / "run") == before


def test_int8_export_of_a_ternary_model_is_one_line(tmp_path, tiny_cifar_root):
    from cifarpress.techniques.quantize.ternary import quantize_model

    model = build_model("resnet20", 10)
    quantize_model(model)
    save_model(tmp_path / "q.pt", model, "resnet20", 10, "cifar10")
    text = (f"name: bad\ndata_root: {tiny_cifar_root}\nmodel: {{arch: resnet20, checkpoint: q.pt}}\n"
            "stages:\n  - export: {precision: int8}\nbench: {batch_sizes: [1], seconds: 0.1, threads: 1}\n")
    with pytest.raises(CifarpressError, match="already quantized") as info:
        run_recipe(load_recipe(write_recipe(tmp_path, text)), tmp_path / "run")
    assert "\n" not in str(info.value)
