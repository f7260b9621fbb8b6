"""`cifarpress train` end to end in subprocesses: kill and resume, one-line errors, torchrun with 2 CPU ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cifarpress.model_file import load_model
from cifarpress.data import load_split
from cifarpress.train.trainer import evaluate

CLI = [sys.executable, "-m", "cifarpress.cli"]


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CIFARPRESS_NO_DOWNLOAD="1", COLUMNS="200",
               PYTHONUNBUFFERED="1")
    env.pop("CIFARPRESS_DATA", None)
    return env


def run(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=cli_env(), **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_killed_run_resumes_with_the_same_command(tiny_cifar_root, tmp_path):
    out = tmp_path / "run"
    cmd = CLI + ["train", "--model", "resnet20", "--epochs", "3", "--batch-size", "16", "--lr", "0.05",
                 "--max-steps-per-epoch", "10", "--out", str(out), "--data-root", str(tiny_cifar_root),
                 "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        deadline = time.monotonic() + 90
        while not (out / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 90 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: like a power cut in epoch 2
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    finished = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"]
    assert finished in (1, 2)  # almost always 1; 2 only if the kill came late on a very busy machine

    again = run(cmd)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and f"after epoch {finished}" in again.stderr
    assert "top-1" in again.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["arch"] == "resnet20" and metrics["dataset"] == "cifar10"
    model, info = load_model(out / "model.pt")
    assert info["arch"] == "resnet20" and info["meta"]["epochs"] == 3
    test = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)
    assert evaluate(model, test) == pytest.approx(metrics["top1"])

    # other settings in the same folder: refused with a pointer to --force
    other = run(cmd[:-2] + ["--lr", "0.1", "--threads", "1"])
    assert_one_line_error(other, "--force")


def test_missing_init_checkpoint_is_one_line(tiny_cifar_root, tmp_path):
    proc = run(CLI + ["train", "--init", str(tmp_path / "missing.pt"), "--epochs", "1", "--out", str(tmp_path / "o"),
                      "--data-root", str(tiny_cifar_root), "--threads", "1"])
    assert_one_line_error(proc, "missing.pt", "not found")
    assert not (tmp_path / "o").exists()


def test_missing_data_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run(CLI + ["train", "--epochs", "1", "--out", str(tmp_path / "o"), "--data-root", str(empty),
                      "--threads", "1"])
    assert_one_line_error(proc, "--data-root", "CIFARPRESS_DATA", str(empty))


@pytest.mark.parametrize("addons", [[], ["ema", "mesa"]], ids=["plain", "ema+mesa"])
def test_torchrun_two_cpu_ranks(tiny_cifar_root, tmp_path, addons):
    out = tmp_path / "ddp"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "cifarpress.cli", "train", "--model", "resnet20", "--epochs", "2", "--batch-size", "32",
                "--max-steps-per-epoch", "3", "--out", str(out), "--data-root", str(tiny_cifar_root),
                "--threads", "1"] + [f"--{name}" for name in addons], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("top-1") == 1  # rank 0 alone reports
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["last.pt", "metrics.json", "model.pt"]
    assert (out / ".cifarpress-run").exists()  # rank 0 made and marked the run folder
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["config"]["world"] == 2 and last["step"] == 6
    assert last["config"]["plugins"] == addons
    model, info = load_model(out / "model.pt")
    assert [t["name"] for t in info["techniques"]] == addons
    if "mesa" in addons:  # each rank's step held its bytes for backward; rank 0 records its own
        assert all(h["saved_bytes"] > 0 for h in metrics["history"])
    test = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)
    top1 = evaluate(model, test)
    assert 0.0 <= top1 <= 100.0
    # every rank evaluated rank 0's model (the saved one) on its shard of the test set
    assert top1 == pytest.approx(metrics["top1"])
