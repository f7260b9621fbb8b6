"""Model files and atomic writes.

A model file is a dict that names how to rebuild the network (zoo name or
`package.module:factory`), its class count and dataset, and its weights, so
`cifarpress eval model.pt` needs no other argument. `builtin:NAME` refers to
the checkpoints shipped inside the package.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CifarpressError
from .models import build_model

FORMAT = "cifarpress-model/1"
BUILTIN_DIR = Path(__file__).parent / "pretrained"


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_model(path, model: nn.Module, arch: str, num_classes: int, dataset: str, meta: dict | None = None) -> Path:
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {"format": FORMAT, "arch": arch, "num_classes": num_classes, "dataset": dataset,
               "state_dict": state, "meta": meta or {}}
    return atomic_torch_save(payload, path)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    text = str(path)
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        candidate = BUILTIN_DIR / f"{name}.pt"
        if not candidate.exists():
            known = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.pt"))) or "none"
            raise CifarpressError(f"no built-in checkpoint '{name}' (available: {known})")
        return candidate
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise CifarpressError(f"checkpoint {resolved} not found; check the path (or train one with `cifarpress train`)")
    return resolved


def read_checkpoint(path: str | os.PathLike) -> dict:
    resolved = resolve_checkpoint(path)
    try:
        payload = torch.load(resolved, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CifarpressError(f"cannot read checkpoint {resolved} ({type(exc).__name__}); is it a torch file?") from None
    return payload


def load_model(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None):
    """Rebuild a model from a cifarpress model file, or from a bare state dict when `arch` is given.

    Returns (model, info) where info holds arch, num_classes, dataset and meta.
    """
    payload = read_checkpoint(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        info = {k: payload[k] for k in ("arch", "num_classes", "dataset")} | {"meta": payload.get("meta", {})}
        state = payload["state_dict"]
    elif isinstance(payload, dict) and arch is not None:
        state = payload.get("state_dict", payload.get("model", payload))
        info = {"arch": arch, "num_classes": num_classes or 10, "dataset": None, "meta": {}}
    else:
        raise CifarpressError(
            f"{path} is not a cifarpress model file; for a plain state dict also give the architecture (--arch)"
        )
    if arch is not None and arch != info["arch"] and payload.get("format") == FORMAT:
        raise CifarpressError(f"{path} holds a '{info['arch']}' model, not '{arch}'")
    model = build_model(info["arch"], info["num_classes"])
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CifarpressError(
            f"{path} does not fit '{info['arch']}': missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; check the architecture and class count"
        )
    return model, info
