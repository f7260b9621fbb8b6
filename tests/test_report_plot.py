"""report.png: the Pareto plot write_report draws next to report.json / report.md."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

import cifarpress.pipeline.report
from cifarpress.pipeline.plot import deployed_bytes, pareto_front, point_names, write_pareto_plot
from cifarpress.pipeline.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu": "Test CPU 9000", "cores": 2, "python": "3.12.0", "system": "Linux"}
RECIPE = SimpleNamespace(name="handmade", dataset="cifar10")


def row(stage: str, top1: float, onnx_mb: float, p50: dict[str, float]) -> dict:
    return {"stage": stage, "dir": f"runs/handmade/{stage}", "top1": top1, "top1_torch": top1,
            "params": int(onnx_mb * 250_000), "macs": int(onnx_mb * 1e7), "onnx_bytes": int(onnx_mb * 1e6),
            "latency_ms": {b: {"p50": v, "p90": v * 1.1, "p99": v * 1.2} for b, v in p50.items()},
            "onnx_check": {"images": 100, "max_abs_diff": 1e-5, "top1_agreement": 100.0},
            "onnxruntime": "1.20.0", "threads": 2}


def rows() -> list[dict]:
    return [row("baseline", 91.5, 1.1, {"1": 1.0, "64": 20.0}),
            row("prune", 90.8, 0.4, {"1": 0.6, "64": 9.0}),
            row("quantize", 89.9, 0.05, {"1": 0.7, "64": 12.0})]  # slower than prune at b64 and less accurate


def test_pareto_front_drops_dominated_points():
    names = ["baseline", "prune", "quantize", "distill"]
    points = [(20.0, 91.5), (9.0, 90.8), (12.0, 89.9), (3.0, 85.0)]  # quantize: dominated by prune
    assert [names[i] for i in pareto_front(points)] == ["distill", "prune", "baseline"]
    # equal cost, lower accuracy is dominated; equal points both stay; missing values take no part
    assert pareto_front([(5.0, 90.0), (5.0, 89.0), (5.0, 90.0), (None, 99.0), (1.0, None)]) == [0, 2]
    assert pareto_front([]) == []


def test_write_report_draws_a_png_and_names_it(tmp_path):
    report = write_report(tmp_path, RECIPE, rows(), [], MACHINE)
    png = tmp_path / "report.png"
    data = png.read_bytes()
    assert len(data) > 0 and data[:8] == PNG_MAGIC
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.width > 100 and img.height > 100
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["plot"] == report["plot"] == "report.png"
    assert [r["stage"] for r in saved["stages"]] == ["baseline", "prune", "quantize"]
    md = (tmp_path / "report.md").read_text()
    assert "](report.png)" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]  # no temp files


def test_plot_shows_batch_1_and_the_largest_batch_and_the_shipped_size(tmp_path):
    mixed = rows()
    mixed[2]["latency_ms"] = {"1": mixed[2]["latency_ms"]["1"], "8": {"p50": 2.0, "p90": 2.1, "p99": 2.2}}
    mixed[1]["latency_ms"]["1"]["p50_range"] = [0.9 * mixed[1]["latency_ms"]["1"]["p50"],
                                               1.2 * mixed[1]["latency_ms"]["1"]["p50"]]
    mixed[2]["packed_bytes"] = 90_000
    assert deployed_bytes(mixed[2]) == (0.09, True) and deployed_bytes(mixed[0])[1] is False
    write_pareto_plot(tmp_path / "mixed.png", {"recipe": "mixed", "machine": MACHINE, "stages": mixed})
    with Image.open(tmp_path / "mixed.png") as img:
        assert img.width > 2 * img.height  # three panels: batch 1, batch 64, size


def test_repeated_stage_names_are_told_apart():
    two = rows()[:2]
    two[1]["stage"], two[1]["dir"] = "baseline", "runs/handmade/03-baseline"
    assert point_names(two) == ["baseline", "03-baseline"]


def test_a_failed_plot_keeps_the_report(tmp_path, monkeypatch, capsys):
    (tmp_path / "report.png").write_bytes(b"stale plot from an earlier run")

    def broken(path, report):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(cifarpress.pipeline.report, "write_pareto_plot", broken)
    report = write_report(tmp_path, RECIPE, rows(), [], MACHINE)
    assert report["plot"] is None
    assert json.loads((tmp_path / "report.json").read_text())["plot"] is None
    md = (tmp_path / "report.md").read_text()
    assert "| quantize |" in md and "report.png" not in md
    assert not (tmp_path / "report.png").exists()
    assert "report.png not drawn (RuntimeError: no fonts)" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["cifarpress", "cifarpress.pipeline.report"])
def test_importing_does_not_load_matplotlib(module):
    code = f"import sys, {module}; assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
