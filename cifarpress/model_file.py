"""Model files: how to rebuild a network, and its weights.

A model file is a dict that names how to rebuild the network (zoo name or
`package.module:factory`), its class count and dataset, and its weights, so
`cifarpress eval model.pt` needs no other argument. `builtin:NAME` refers to
the checkpoints shipped inside the package.

Compression changes a network's shape, so the file also records the
constructor arguments of every Conv/BatchNorm/Linear layer and the list of
techniques applied (with their configs, and the per-layer state of those that
swap layers, such as a quantizer): loading builds the named architecture,
resizes the layers that differ (a pruned model), replays the recorded
techniques through the catalogue, and only then loads the weights. No pickled
code is involved, and this module names no technique.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.models import build_model, trusting
from cifarpress.models.layers import STAND_INS
from cifarpress.utils.io import atomic_torch_save
from cifarpress.utils.modules import unwrap

FORMAT = "cifarpress-model/1"
BUILTIN_DIR = Path(__file__).parent / "pretrained"


def layer_spec(module: nn.Module) -> dict | None:
    """Constructor arguments of a Conv2d/BatchNorm/Linear layer (subclasses such as quantized layers too),
    or of what pruning put in place of an emptied one (layers.py stand-ins, Identity for its BatchNorm)."""
    if isinstance(module, tuple(STAND_INS.values())):
        return module.spec()
    if type(module) is nn.Identity:
        return {"type": "Identity"}
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": list(module.padding) if not isinstance(module.padding, str) else module.padding,
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return {"type": "BatchNorm2d" if isinstance(module, nn.BatchNorm2d) else "BatchNorm1d",
                "num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
                "affine": module.affine, "track_running_stats": module.track_running_stats}
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    return None


def describe_layers(model: nn.Module) -> dict[str, dict]:
    return {name: spec for name, m in unwrap(model).named_modules() if (spec := layer_spec(m)) is not None}


def _build_layer(spec: dict) -> nn.Module:
    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "type"}
    return (STAND_INS.get(spec["type"]) or getattr(nn, spec["type"]))(**args)


def resize_layers(model: nn.Module, specs: dict[str, dict]) -> int:
    """Replace every layer whose recorded spec differs from the model's; returns how many changed."""
    current = describe_layers(model)
    changed = 0
    for name, spec in specs.items():
        if name not in current:
            raise CifarpressError(f"the model file names a layer '{name}' that the architecture does not have")
        if current[name] != spec:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, _build_layer(spec))
            changed += 1
    return changed


def save_model(path, model: nn.Module, arch: str, num_classes: int, dataset: str, meta: dict | None = None,
               techniques: list[dict] | None = None) -> Path:
    """Write a model file. `techniques`: what was applied to the model, oldest first, as {name, config}
    entries; each catalogued technique that records per-layer state (a quantizer) adds it to its entry
    (or an entry of its own), which is what loading replays before the weights go in."""
    model = unwrap(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "arch": arch, "num_classes": num_classes, "dataset": dataset,
               "state_dict": state, "layers": describe_layers(model), "meta": meta or {},
               "techniques": _recorded_techniques(model, techniques or [])}
    return atomic_torch_save(payload, path)


def _recorded_techniques(model: nn.Module, applied: list[dict]) -> list[dict]:
    from cifarpress.techniques import CATALOGUE
    from cifarpress.techniques.base import load_function

    entries = [{k: v for k, v in entry.items() if k != "state"} for entry in applied]
    for technique in CATALOGUE:
        state = load_function(technique.record)(model) if technique.record else None
        if state is None:
            continue
        mine = [e for e in entries if e.get("name") == technique.name]
        if not mine:  # applied outside a recorded stage (a model quantized through the API): an entry of its own
            entries.append({"name": technique.name})
            mine = entries[-1:]
        mine[-1]["state"] = state
    return entries


def _replay(model: nn.Module, payload: dict, path) -> list[dict]:
    """Rebuild the layers that recorded techniques put in (before the weights load); returns the record.
    A file from before the catalogue holds a `quantization` entry instead of `techniques`."""
    from cifarpress.techniques import TECHNIQUES
    from cifarpress.techniques.base import load_function

    entries = list(payload.get("techniques") or [])
    if not entries and payload.get("quantization"):
        entries = [{"name": "quantize", "state": payload["quantization"]}]
    for entry in entries:
        if "state" not in entry:
            continue
        technique = TECHNIQUES.get(entry.get("name"))
        if technique is None or technique.restore is None:
            raise CifarpressError(f"{path} was written with technique '{entry.get('name')}', which this "
                                  f"cifarpress cannot rebuild; load it with the version that wrote it")
        load_function(technique.restore)(model, entry["state"])
    return entries


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
    if resolved.is_dir():
        raise CifarpressError(f"checkpoint {resolved} is a folder; give a model file (.pt) inside it")
    if not resolved.is_file():
        raise CifarpressError(f"checkpoint {resolved} not found; check the path (or train one with `cifarpress train`)")
    return resolved


def read_checkpoint(path: str | os.PathLike) -> dict:
    resolved = resolve_checkpoint(path)
    try:
        payload = torch.load(resolved, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CifarpressError(
            f"{resolved} holds Python objects beyond tensors and plain data (code, or a pickled model), which "
            f"cifarpress does not load; save a state dict instead: torch.save(model.state_dict(), path)") from None
    except Exception as exc:  # torch raises many types for a corrupt file
        kind = "empty" if resolved.stat().st_size == 0 else f"{type(exc).__name__}"
        raise CifarpressError(f"cannot read checkpoint {resolved} ({kind}); it is not a complete torch file "
                              f"(an interrupted copy?): write it again") from None
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
    with trusting(arch):  # the caller's --arch names the factory itself
        model = build_model(info["arch"], info["num_classes"], recorded_in=str(path))
    if payload.get("layers"):
        info["resized_layers"] = resize_layers(model, payload["layers"])
    info["techniques"] = _replay(model, payload, path) if payload.get("format") == FORMAT else []
    quantized = next((e["state"] for e in info["techniques"] if e.get("name") == "quantize" and "state" in e), None)
    if quantized:
        info["quantization"] = quantized  # the record's older name, kept for readers of `info`
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: wrong architecture or class count
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise CifarpressError(
            f"{path} does not fit '{info['arch']}' with {info['num_classes']} classes ({first}); "
            f"check --arch and --num-classes") from None
    if result.missing_keys or result.unexpected_keys:
        raise CifarpressError(
            f"{path} does not fit '{info['arch']}': missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; check the architecture and class count"
        )
    return model, info
