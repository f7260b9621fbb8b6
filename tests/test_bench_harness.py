"""bench/harness.py: arms resume, rerun on request, leave no record when interrupted; results carry provenance."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_harness", BENCH / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules["bench_harness"] = harness
_spec.loader.exec_module(harness)

MACHINE = {"cpu": "test CPU", "cores": 1}


@pytest.fixture(autouse=True)
def fixed_machine(monkeypatch):
    """The real record is exercised once (test_machine_record_is_read_lazily); elsewhere a stand-in keeps it fast."""
    monkeypatch.setattr(harness, "machine", lambda: dict(MACHINE))


def counting_work(calls: list, payload: dict | None = None):
    def work(folder: Path) -> dict:
        calls.append(folder)
        (folder / "model.pt").write_text("weights")
        return dict(payload or {"threads": 2})
    return work


def test_finished_arm_is_not_run_again(tmp_path):
    calls = []
    first = harness.Arms(tmp_path, log=lambda _: None).run("kd", counting_work(calls))
    assert calls == [tmp_path / "kd"] and first["arm"] == "kd" and first["threads"] == 2
    assert first["wall_s"] >= 0 and first["provenance"]["resumed"] is False
    again = harness.Arms(tmp_path, log=lambda _: None)  # a second invocation of the script
    assert again.done("kd") and again.run("kd", counting_work(calls)) == first
    assert len(calls) == 1 and again.missing(["kd", "alone"]) == ["alone"]


def test_forced_rerun_runs_again_once_and_keeps_the_old_folder(tmp_path):
    calls = []
    harness.Arms(tmp_path, log=lambda _: None).run("kd", counting_work(calls))
    forced = harness.Arms(tmp_path, rerun={"kd"}, log=lambda _: None)
    record = forced.run("kd", counting_work(calls, {"threads": 1}))
    assert len(calls) == 2 and record["threads"] == 1 and forced.record("kd") == record
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("kd.replaced-")]
    assert len(aside) == 1 and (aside[0] / "model.pt").exists()  # nothing deleted
    forced.run("kd", counting_work(calls))  # the same process asking again: finished now
    assert len(calls) == 2
    harness.Arms(tmp_path, rerun=True, log=lambda _: None).run("kd", counting_work(calls))
    assert len(calls) == 3


def test_interrupted_arm_leaves_no_record_and_resumes(tmp_path):
    arms = harness.Arms(tmp_path, record_file="seconds.json", time_key="train_s", log=lambda _: None)

    def interrupted(folder: Path):
        (folder / "last.pt").write_text("epoch 3")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        arms.run("alone", interrupted)
    assert not arms.done("alone") and arms.record("alone") is None
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["last.pt"]  # no temp file either
    record = arms.run("alone", counting_work([]))
    assert record["provenance"]["resumed"] is True and "train_s" in record
    assert json.loads((tmp_path / "alone" / "seconds.json").read_text()) == record


def test_record_of_an_earlier_scripts_folder_is_read_as_is(tmp_path):
    (tmp_path / "tp-taylor").mkdir()
    (tmp_path / "tp-taylor" / "seconds.json").write_text('{"train_s": 12.5, "threads": 1}')
    arms = harness.Arms(tmp_path, record_file="seconds.json", time_key="train_s", log=lambda _: None)
    assert arms.run("tp-taylor", counting_work(calls := [])) == {"train_s": 12.5, "threads": 1} and not calls


def test_provenance_names_commit_command_and_machine(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench/distill.py", "--arms", "kd", "--tag", "30 ep"])
    p = harness.provenance(started_at="2026-01-01T00:00:00+00:00")
    assert {"commit", "dirty", "command", "argv", "cwd", "started_at", "ended_at", "machine"} <= set(p)
    assert p["command"] == "python bench/distill.py --arms kd --tag '30 ep'" and p["argv"][0] == "bench/distill.py"
    assert p["machine"] == MACHINE and p["started_at"] == "2026-01-01T00:00:00+00:00"
    assert p["ended_at"] >= p["started_at"]
    if p["commit"] is not None:  # a git checkout (the harness tolerates none)
        assert re.fullmatch(r"[0-9a-f]{40}", p["commit"]) and isinstance(p["dirty"], bool)


def test_git_state_without_a_repository(tmp_path):
    assert harness.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_results_file_is_json_with_provenance_and_written_atomically(tmp_path):
    out = tmp_path / "results" / "distill.json"
    harness.write_results(out, {"arms": {"kd": {"top1": 90.0}}, "machine": {"cpu": "measured"}})
    result = json.loads(out.read_text())
    assert result["arms"] == {"kd": {"top1": 90.0}} and result["machine"] == {"cpu": "measured"}
    assert result["provenance"]["machine"] == {"cpu": "measured"}  # the result's own record, not a second one
    with pytest.raises(TypeError):  # fails while serializing: the old file stays whole, no temp file is left
        harness.write_results(out, {"not json": object()})
    assert json.loads(out.read_text()) == result and [p.name for p in out.parent.iterdir()] == ["distill.json"]


def test_machine_record_is_read_lazily(monkeypatch):
    monkeypatch.undo()  # the real harness.machine
    tree = ast.parse((BENCH / "harness.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top_level for a in n.names] + [n.module or "" for n in top_level
                                                            if isinstance(n, ast.ImportFrom)]
    assert not any(name.startswith("cifarpress") for name in names)
    assert {"cpu", "python"} <= set(harness.machine())


def test_bench_scripts_import_only_what_the_harness_has():
    for script in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "harness":
                missing = [a.name for a in node.names if not hasattr(harness, a.name)]
                assert not missing, f"{script.name} imports {missing} from the harness"
