"""What a model file records about a quantized model, and how loading replays it (through the catalogue).

The record is the quantizer's policy with its per-layer choices (which layers stay int8); the per-layer
state that changes in training (scales, ranges) travels in the state dict."""
from __future__ import annotations

from torch import nn

from cifarpress.techniques.quantize.ternary import TernaryConfig, config_from_model, quantize_model, quantized_layers


def record(model: nn.Module) -> dict | None:
    layers = quantized_layers(model)
    if not layers:
        return None
    # AdaPT's layers rebuild through the same swap: config_from_model keeps every non-ternary layer, and the
    # state dict then brings back each one's word and fractional length.
    method = "adapt" if any(layer.fixed_point for layer in layers.values()) else "ternary"
    return {"method": method, "config": config_from_model(model).to_dict()}


def restore(model: nn.Module, recorded: dict) -> None:
    quantize_model(model, TernaryConfig.from_dict(recorded["config"]))
