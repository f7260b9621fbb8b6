"""`cifarpress prune` and `cifarpress quantize`: one-stage recipes built from options, in process."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cifarpress.cli import app

# Tiny training and benches: a few steps, one batch size, a short timing budget, one thread.
def quick(epochs: int = 1) -> list[str]:
    return ["--epochs", str(epochs), "--max-steps-per-epoch", "2", "--batch-size", "32", "--threads", "1",
            "-b", "1", "--bench-seconds", "0.05", "--bench-threads", "1"]


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200", "CIFARPRESS_NO_DOWNLOAD": "1"})


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_quantize_writes_report_and_packed_file(tiny_cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default --out is runs/quantize-<arch>, under the current folder
    result = invoke(["quantize", "--set", "scale=absmedian", "--data-root", str(tiny_cifar_root)] + quick())
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "quantize-resnet20"  # arch read from the default builtin checkpoint
    assert f"report: {run_dir.relative_to(tmp_path) / 'report.json'}" in result.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"] == "quantize-resnet20" and report["dataset"] == "cifar10"
    assert [row["stage"] for row in report["stages"]] == ["baseline", "quantize"]
    row = report["stages"][1]
    assert row["packed_bytes"] > 0 and (tmp_path / row["packed"]).is_file()
    assert {layer["precision"] for layer in row["layers"]} == {"int8", "ternary"}
    assert report["deployable"]["artifact"].endswith("02-export/model.onnx")
    assert "| quantize |" in result.stdout  # the report table is printed


def test_prune_cuts_macs(tiny_cifar_root, tmp_path):
    out = tmp_path / "run"
    result = invoke(["prune", "--target", "0.5", "--set", "pruning_periods=1", "--lr", "0.05",
                     "--out", str(out), "--data-root", str(tiny_cifar_root)] + quick(epochs=2))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    base, pruned = report["stages"]
    assert [base["stage"], pruned["stage"]] == ["baseline", "prune"]
    assert pruned["macs"] < base["macs"] and pruned["params"] < base["params"]
    assert (out / "02-export" / "model.onnx").is_file()


@pytest.mark.parametrize("args, needles", [
    (["prune", "--target", "1.5"], ["cifarpress prune:", "--target", "prune.sparsity", "less than 1"]),
    (["prune", "--target-kind", "macs", "--target", "0"], ["--target", "prune.macs", "greater than 0"]),
    (["prune", "--method", "l1"], ["--method", "prune.method", "hesso"]),
    (["quantize", "--set", "scale=mean"], ["cifarpress quantize:", "--set scale", "quantize.scale", "absmean"]),
    (["prune", "--set", "penalty=0.5"], ["--set penalty", "prune.penalty", "unknown key for method hesso"]),  # dhspg's, not hesso's
    (["prune", "--method", "dhspg", "--set", "penalty=0"], ["--set penalty", "greater than 0"]),
    (["prune", "--set", "channel_multiple"], ["--set 'channel_multiple'", "KEY=VALUE"]),
    (["quantize", "--checkpoint", "builtin:nope"], ["--checkpoint", "no built-in checkpoint 'nope'"]),
])
def test_bad_options_are_one_line_naming_the_field(tmp_path, args, needles):
    result = invoke(args + ["--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(["quantize", "--checkpoint", "models/missing.pt", "--out", "o"])
    assert_one_line_error(result, "--checkpoint", str(tmp_path / "models" / "missing.pt"), "not found")
    assert not (tmp_path / "o").exists()


def test_help_lists_the_stage_options():
    for command, options in (("prune", ["--target", "--target-kind", "--method", "--out"]),
                             ("quantize", ["--method", "--ema", "--set", "--out"])):
        result = invoke([command, "--help"])
        assert result.exit_code == 0, result.output
        for option in options:
            assert option in result.output, (command, option)


def test_set_reaches_nested_blocks_and_lists():
    from cifarpress.cli import parse_settings

    assert parse_settings(["keep=[conv1, fc]", "distill.method=dkd", "distill.beta=4", "act_bits=8"], "quantize") == {
        "keep": ["conv1", "fc"], "distill": {"method": "dkd", "beta": 4}, "act_bits": 8}


def test_stages_lists_every_catalogued_field():
    result = invoke(["stages", "prune"])
    assert result.exit_code == 0, result.output
    for needle in ("method: hesso", "method: dhspg", "pruning_periods = 5", "penalty = 0.1", "distill = None",
                   "ema = False", "epochs = 10"):
        assert needle in result.output, needle
    assert invoke(["stages", "nope"]).exit_code != 0
