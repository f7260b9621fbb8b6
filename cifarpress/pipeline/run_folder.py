"""Run folders: the only folders cifarpress will delete, and only one process at a time.

A run folder (`cifarpress compress`, `cifarpress train`, the single-stage
commands) is marked with a `.cifarpress-run` file when cifarpress creates it.
`--force` empties a folder only if it carries that mark (or is empty), never
the working directory, the home folder or a folder above them, so a mistyped
`--out` cannot delete a user's files. While a run works in its folder it
holds an advisory lock (`fcntl.flock` on `.cifarpress-run.lock`): a second
run on the same folder stops in one line that names the process holding it.
The lock dies with its process (kill -9 included), so a stale lock never blocks.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from pathlib import Path

from cifarpress.errors import CifarpressError

MARKER = ".cifarpress-run"
LOCK = ".cifarpress-run.lock"
# Temporary files of atomic writes (utils: `.<name>.<hex>.tmp`) older than this are leftovers of a killed run.
STALE_TMP_S = 60.0


def _os_error(path: Path, exc: OSError, what: str, fix: str = "choose another --out") -> CifarpressError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENAMETOOLONG:
        return CifarpressError(f"cannot {what} {str(path)[:60]}... : the name is too long; give a shorter "
                               f"name (recipe name: or --out)")
    return CifarpressError(f"cannot {what} {path} ({reason}); {fix}")


def _protected(path: Path) -> bool:
    """The working directory, the home folder, the filesystem root, or a folder holding one of them."""
    resolved = path.resolve()
    for keep in (Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)):
        if resolved == keep or resolved in keep.parents:
            return True
    return False


def check_can_clear(path: Path) -> None:
    """Raise unless `--force` may empty `path` (called before any work, so nothing is deleted on a bad recipe)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise CifarpressError(f"--out {path} is a file, not a folder; choose another --out")
    if _protected(path):
        raise CifarpressError(f"--force would delete {path}, which holds the working directory or your home "
                              f"folder; choose a run folder of its own with --out")
    if not (path / MARKER).exists() and any(path.iterdir()):
        raise CifarpressError(f"--force refuses to delete {path}: cifarpress did not create it (no {MARKER} "
                              f"inside); choose another --out or delete it yourself")


def _clear(path: Path) -> None:
    """Delete the contents of a run folder except its lock (which this process holds)."""
    for child in path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def clean_stale_tmp(path: Path, older_than_s: float = STALE_TMP_S) -> int:
    """Remove leftover temporary files of atomic writes interrupted by a kill; returns how many."""
    removed, now = 0, time.time()
    for tmp in Path(path).rglob(".*.tmp"):
        try:
            if tmp.is_file() and now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except OSError:
            continue
    return removed


class RunFolder:
    """Create (or reuse) a run folder, lock it, and empty it first when forced.

        with RunFolder(out, force=force):
            ...  # train, write stages

    Reusing a folder without `--force` resumes whatever finished there."""

    def __init__(self, path: str | os.PathLike, force: bool = False, command: str | None = None):
        self.path = Path(path)
        self.force = force
        self.command = command or " ".join(["cifarpress"] + sys.argv[1:2])
        self._fd: int | None = None

    def __enter__(self) -> Path:
        if self.force:
            check_can_clear(self.path)
        elif self.path.exists() and not self.path.is_dir():
            raise CifarpressError(f"--out {self.path} is a file, not a folder; choose another --out")
        # Mark only a folder this run creates (or finds empty): a user's folder of other files named
        # by --out is written into, but never becomes one that --force may empty.
        fresh = not self.path.exists() or not any(p.name != LOCK for p in self.path.iterdir())
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            if self.force and not fresh:
                _clear(self.path)
            if fresh or self.force:
                (self.path / MARKER).touch()
        except OSError as exc:
            self._unlock()
            raise _os_error(self.path, exc, "create the run folder") from None
        clean_stale_tmp(self.path)
        return self.path

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CifarpressError(f"run folder {self.path} is in use by {holder}; wait for it to finish or "
                                  f"choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} ({self.command})".encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __exit__(self, *exc) -> None:
        self._unlock()


def check_writable(path: str | os.PathLike, option: str = "--json") -> Path:
    """Fail in one line, before any measurement, if a result file cannot be written at `path`."""
    path = Path(path)
    if path.is_dir():
        raise CifarpressError(f"{path} is a folder; give a file name to write the result to")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe.tmp"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise _os_error(path, exc, "write", f"choose another {option}") from None
    return path
