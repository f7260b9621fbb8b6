"""Atomic writes: a reader (or a crash) never sees half a file, so finished work survives an interrupted run."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _new_file_beside(path: Path) -> str:
    """Create an empty, uniquely named temporary file next to `path`.

    Made with mode 0o666 so the umask applies as for open(): mkstemp's files are
    owner-only, and a shared ONNX file or report must not end up that way."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
