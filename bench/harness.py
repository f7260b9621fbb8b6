"""What the bench scripts share: arms in resumable work folders, their timing, and provenance.

A bench script compares *arms* (configurations of one experiment). Training arms take minutes to
hours and may run in separate processes, so each arm works in its own folder under a root and
counts as finished once its record file is there. The record is written atomically after the
arm's work returns, so an arm that is killed or raises leaves no record and runs again next time
(picking up whatever checkpoints its work left in the folder).

    arms = Arms(work_root, rerun={"kd"}, log=console.print)
    record = arms.run("kd", lambda folder: train(folder) or {"threads": 2})  # skipped if finished
    arms.done("alone"), arms.record("alone")
    atomic_write_json(out, with_provenance(result))   # or write_results(out, result)

Provenance (`provenance()`): the git commit and whether the tree had uncommitted changes, the
command line and working folder, start and end time (UTC), and the machine record
(cifarpress.runtime.latency.machine_description: CPU, SIMD, Python and library versions).

Nothing here imports cifarpress at module level: the machine record is read when it is needed,
so importing the harness is cheap and does not tie it to the package's layout.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# When this process began its bench work, near enough: scripts import the harness first thing.
PROCESS_STARTED_AT = utc_now()


def git_state(repo: str | os.PathLike = REPO) -> dict:
    """{"commit": full hash, "dirty": uncommitted changes to tracked files}; None for both without git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0:  # not a checkout (e.g. an unpacked release)
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hung
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def command_line(argv: list[str] | None = None) -> str:
    """The command as it can be typed again (arguments quoted where the shell needs it)."""
    return "python " + shlex.join(sys.argv if argv is None else argv)


def machine() -> dict:
    """The machine record, imported only when asked for (see the module docstring)."""
    from cifarpress.runtime.latency import machine_description

    return machine_description()


def provenance(started_at: str | None = None, machine_record: dict | None = None) -> dict:
    """Where a result came from. started_at defaults to when this process imported the harness;
    pass a machine record already taken (a result's "machine") to keep the two identical."""
    return {**git_state(), "command": command_line(), "argv": list(sys.argv), "cwd": os.getcwd(),
            "started_at": started_at or PROCESS_STARTED_AT, "ended_at": utc_now(),
            "machine": machine_record if machine_record is not None else machine()}


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it over: readers (and a resumed
    run looking for a finished arm) never see half a file, and a failed write leaves none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; honour the umask as open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def with_provenance(result: dict, started_at: str | None = None) -> dict:
    """Add result["provenance"] (reusing result["machine"] if the script took one) and return result."""
    result["provenance"] = provenance(started_at, result.get("machine"))
    return result


def write_results(path: str | os.PathLike, result: dict, started_at: str | None = None) -> Path:
    """The final results JSON, written atomically with its provenance block."""
    return atomic_write_json(path, with_provenance(result, started_at))


def _unused_name(path: Path) -> Path:
    """path, or path-1, path-2, ...: two reruns in one second must not collide."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


class Arms:
    """Arms of one experiment, each in its own folder `root/<name>`, finished once `record_file` is there.

    rerun: names of arms to run again from scratch even if finished (True: every arm). The old
    folder is renamed to `<name>.replaced-<UTC time>` rather than deleted: it may hold checkpoints
    someone still wants, so the harness deletes nothing.
    record_file, time_key: the record's file name and the key of its wall time, so that a script
    can keep reading (and resuming) work folders its earlier versions wrote.
    """

    def __init__(self, root: str | os.PathLike, rerun: bool | Collection[str] = (), *,
                 record_file: str = "arm.json", time_key: str = "wall_s", log: Callable[[str], Any] = print):
        self.root = Path(root)
        self.rerun = rerun
        self.record_file, self.time_key, self.log = record_file, time_key, log
        self._rerun_done: set[str] = set()  # a forced arm runs again once per process, not on every call

    def folder(self, name: str) -> Path:
        return self.root / name

    def record(self, name: str, folder: str | os.PathLike | None = None) -> dict | None:
        """The finished arm's record (from `folder` instead of the arm's own, e.g. a reused run), else None."""
        path = Path(folder if folder is not None else self.folder(name)) / self.record_file
        return json.loads(path.read_text()) if path.is_file() else None

    def done(self, name: str) -> bool:
        return (self.folder(name) / self.record_file).is_file()

    def _forced(self, name: str) -> bool:
        wanted = self.rerun is True or (not isinstance(self.rerun, bool) and name in self.rerun)
        return wanted and name not in self._rerun_done

    def run(self, name: str, work: Callable[[Path], dict | None]) -> dict:
        """Run work(folder) unless the arm is finished, and record it: returns the arm's record.

        work's returned dict goes into the record beside the wall time of this attempt and the
        provenance; "resumed" there says the folder held an earlier, interrupted attempt's files,
        so the time covers only this attempt's share of the work."""
        folder = self.folder(name)
        if self._forced(name):
            self._rerun_done.add(name)
            if folder.exists():
                stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
                aside = _unused_name(folder.with_name(f"{name}.replaced-{stamp}"))
                folder.rename(aside)
                self.log(f"{name}: run again; the earlier folder is now {aside}")
        elif (finished := self.record(name)) is not None:
            self.log(f"{name}: finished earlier, kept")
            return finished
        resumed = folder.is_dir() and any(folder.iterdir())
        folder.mkdir(parents=True, exist_ok=True)
        started_at, t0 = utc_now(), time.perf_counter()
        extra = work(folder) or {}  # an exception here propagates and leaves no record: not finished
        seconds = time.perf_counter() - t0
        record = {"arm": name, **extra, self.time_key: seconds,
                  "provenance": {**provenance(started_at), "resumed": resumed}}
        atomic_write_json(folder / self.record_file, record)
        return record

    def missing(self, names: Collection[str]) -> list[str]:
        return [n for n in names if not self.done(n)]
