"""BitNet b1.58 ternary quantization-aware training for CIFAR CNNs.

Weights: Wq = RoundClip(W / s, -1, 1) * s, with s = mean|W| ("absmean", Ma et al.
2024, "The Era of 1-bit LLMs") or median|W| ("absmedian", Nielsen & Schneider-Kamp
2024, "BitNet b1.58 Reloaded", steadier on small networks), one s per tensor (as
in the papers) or one per output channel. s is guarded by EPS, so an all-zero
tensor quantizes to zeros rather than NaN. The medians are torch's lower median
(an element of |W|, not the mean of the two middle ones). The fp32 latent weights
learn through a straight-through estimator (STE).

Layers that the policy keeps get symmetric int8 weights with one absmax scale per
output channel. By default these are the first conv, which sees raw pixels through
3 input channels, and the classifier, whose errors land on the logits. Together
they hold 0.4% of resnet20's weights.

Activations (act_bits=8; off by default, so the default is W1.58A32): symmetric
int8 fake quant of each swapped layer's input, with scale absmax / 127, in
[-128, 127], with zero point 0. Zero point 0 is the only one TensorRT's explicit
quantization takes. After a ReLU this leaves the negative half of the range
unused, and that is the price of staying symmetric. Training quantizes with the
dynamic absmax of the batch ("tensor") or of each image ("sample", BitNet's
per-token scale carried over to images). Training also keeps a running absmax
(momentum 0.1, as in BN). Evaluation and export use that running absmax as one
static per-tensor scale, for two reasons: an int8 engine needs constant scales,
and a classifier's answer for one image must not depend on the rest of its batch.
So act_granularity="sample" only changes training. Models that never trained
with act_bits=8 get their ranges from `calibrate_activations`.

Per-layer widths: this module is the ternary policy over the generic layers of
fake_quant.py, where the weight precision is each layer's `weight_bits` buffer.
quantize_model only sets the starting widths (ternary, or int8 for kept layers);
`layer.set_weight_bits(b)` moves a layer to b-bit absmax codes (2 <= b <= 16) or
back to ternary at any time, and the width is saved and restored with the state
dict. TernaryConfig and config_from_model therefore describe the scale rules and
which layers start non-ternary, not the widths themselves.

Which layers: every nn.Conv2d and nn.Linear, and their subclasses that compute what the parent computes
(computes_as_parent: no state beyond weight and bias, and the parent's forward, or one that matches it on a
probe), such as timm's Linear. Other subclasses (a weight-standardized conv) keep their own forward and stay
float, with a warning naming them.

Warm-up: over `warmup_steps` optimizer steps the training forward moves from the
float weights (blend 0) to the quantized ones (blend 1). Evaluation always sees
the fully quantized weights, so every reported accuracy is the deployable one.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Iterable

import torch
from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.techniques.quantize.fake_quant import (  # noqa: F401  (re-exported: the names importers use)
    ACT_MOMENTUM,
    EPS,
    INT8_MAX,
    TERNARY,
    TERNARY_BITS,
    FakeQuantConv2d,
    FakeQuantLayer,
    FakeQuantLinear,
    absmax_scale,
    activation_scale,
    fake_quantize_activation,
    int8_weight_scale,
    round_clip,
    straight_through,
    ternary_scale,
)
from cifarpress.utils.modules import unwrap

SCALES = ("absmean", "absmedian")
GRANULARITIES = ("tensor", "channel")
ACT_BITS = (None, 8)
ACT_GRANULARITIES = ("tensor", "sample")


# -- the policy ---------------------------------------------------------------------

@dataclass
class TernaryConfig:
    """What to quantize and how. keep=None keeps the first conv and the classifier at int8."""

    scale: str = "absmean"  # "absmean" | "absmedian"
    granularity: str = "tensor"  # "tensor" | "channel": one ternary scale per tensor or per output channel
    act_bits: int | None = None  # None: float activations; 8: int8 inputs to every swapped layer
    act_granularity: str = "tensor"  # "tensor" | "sample": the dynamic training scale; export is per tensor
    keep: list[str] | None = None  # layer names kept at int8 weights; None = automatic, [] = none
    warmup_steps: int = 0  # steps of float-to-ternary blending at the start of training

    def __post_init__(self) -> None:
        self._check_choice("scale", SCALES)
        self._check_choice("granularity", GRANULARITIES)
        self._check_choice("act_granularity", ACT_GRANULARITIES)
        if self.act_bits not in ACT_BITS:
            raise CifarpressError(
                f"TernaryConfig.act_bits={self.act_bits!r} is not supported; use None (float activations) or 8")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise CifarpressError(
                f"TernaryConfig.warmup_steps={self.warmup_steps!r} is invalid; use a whole number of steps >= 0")
        if self.keep is not None:
            if isinstance(self.keep, str) or not all(isinstance(n, str) for n in self.keep):
                raise CifarpressError(f"TernaryConfig.keep={self.keep!r} is invalid; give a list of layer names")
            self.keep = list(self.keep)

    def _check_choice(self, field_name: str, allowed: tuple) -> None:
        value = getattr(self, field_name)
        if value not in allowed:
            raise CifarpressError(f"TernaryConfig.{field_name}={value!r} is not supported; "
                                  f"use one of: {', '.join(map(repr, allowed))}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TernaryConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CifarpressError(f"unknown ternary setting {unknown[0]!r}; use only: {', '.join(sorted(known))}")
        return cls(**values)


# -- the layers ---------------------------------------------------------------------
# The precision is each layer's `weight_bits` state (fake_quant.py); these classes only name the width a
# layer starts at under this policy, and a later set_weight_bits is free to change it.

class TernaryConv2d(FakeQuantConv2d):
    """Conv2d that starts with BitNet b1.58 ternary weights {-s, 0, s}."""

    initial_bits = "ternary"


class TernaryLinear(FakeQuantLinear):
    """Linear that starts with BitNet b1.58 ternary weights {-s, 0, s}."""

    initial_bits = "ternary"


class Int8Conv2d(FakeQuantConv2d):
    """Conv2d that starts with symmetric per-output-channel int8 weights (kept layers)."""

    initial_bits = 8


class Int8Linear(FakeQuantLinear):
    """Linear that starts with symmetric per-output-channel int8 weights (kept layers)."""

    initial_bits = 8


QUANTIZED_TYPES = {
    ("ternary", nn.Conv2d): TernaryConv2d, ("ternary", nn.Linear): TernaryLinear,
    ("int8", nn.Conv2d): Int8Conv2d, ("int8", nn.Linear): Int8Linear,
}


# -- swapping and inspecting a model ----------------------------------------------------

FLOAT_BASES = (nn.Conv2d, nn.Linear)  # what QUANTIZED_TYPES swaps, by the parent a layer computes as


def _float_base(layer: nn.Module) -> type | None:
    """nn.Conv2d or nn.Linear where `layer` is one (or a subclass of one, not already quantized); else None."""
    if isinstance(layer, FakeQuantLayer):
        return None
    return next((base for base in FLOAT_BASES if isinstance(layer, base)), None)


def _probe(layer: nn.Module, base: type) -> torch.Tensor:
    p = layer.weight
    gen = torch.Generator().manual_seed(0)
    if base is nn.Linear:
        return torch.randn(3, 2, layer.in_features, generator=gen).to(p.device, p.dtype)  # tokens, as timm's are
    reach = max(d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size))
    size = reach + 2 * max(layer.stride) + 3
    return torch.randn(2, layer.in_channels, size, size, generator=gen).to(p.device, p.dtype)


@torch.no_grad()
def computes_as_parent(layer: nn.Module, base: type) -> bool:
    """Whether a subclass of nn.Conv2d/nn.Linear computes exactly what `base` computes with its weight and bias,
    so that the quantized swap (the parent's computation on quantized weights) changes only the weights.

    The rule: the subclass holds no parameters, buffers or submodules beyond weight and bias (the swap would
    drop them), and either overrides neither forward nor Conv2d's _conv_forward, or overrides one and gives
    the parent's output (to float rounding) on a fixed random probe, in training and in eval mode: timm's
    Linear, whose forward is F.linear(x, self.weight, self.bias), passes; a weight-standardized conv, whose
    forward transforms the weight, fails. The layer's hooks are not run. A probe cannot see a forward that
    differs only on other inputs; such a layer is one no model here has."""
    own = {n for n, _ in layer.named_parameters(recurse=False)} | {n for n, _ in layer.named_buffers(recurse=False)}
    if own - {"weight", "bias"} or next(layer.children(), None) is not None:
        return False
    cls = type(layer)
    if cls.forward is base.forward and (base is not nn.Conv2d or cls._conv_forward is base._conv_forward):
        return True
    x, was_training = _probe(layer, base), layer.training
    try:
        for mode in (True, False):
            layer.train(mode)
            got, expected = layer.forward(x), base.forward(layer, x)
            if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(
                    got, expected, rtol=1e-5, atol=1e-6 * max(1.0, float(expected.abs().max())))):
                return False
    except Exception:  # a forward that cannot run on the probe is not the parent's
        return False
    finally:
        layer.train(was_training)
    return True


def _float_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(the layers the swap quantizes, {layer: class name} of the Conv2d/Linear subclasses it leaves float)."""
    layers, left = {}, {}
    for name, m in model.named_modules():
        base = _float_base(m)
        if base is None:
            continue
        if type(m) is base or computes_as_parent(m, base):
            layers[name] = m
        else:
            left[name] = type(m).__name__
    return layers, left


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """nn.Conv2d / nn.Linear modules by path, and their subclasses that compute as the parent does
    (computes_as_parent: e.g. timm's Linear); other subclasses have their own forward and stay float."""
    return _float_layers(model)[0]


def quantized_layers(model: nn.Module) -> dict[str, FakeQuantLayer]:
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, FakeQuantLayer)}


def default_keep(layers: dict[str, nn.Module]) -> list[str]:
    """The first conv and the classifier (the last Linear, or the last conv of an all-conv net)."""
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    keep = convs[:1] + (linears[-1:] or convs[-1:])
    return list(dict.fromkeys(keep))  # a one-conv model names it once


def _replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)


def quantize_model(model: nn.Module, config: TernaryConfig | None = None) -> dict[str, str]:
    """Swap every Conv2d/Linear of `model` in place; returns {layer name: "ternary" | "int8"}.

    These are the policy's starting widths; set_weight_bits changes any layer's later.
    """
    config = config or TernaryConfig()
    model = unwrap(model)
    if quantized_layers(model):
        raise CifarpressError("the model already holds quantized layers; pass the float model to quantize_model")
    layers, left_float = _float_layers(model)
    if left_float:  # a subclass with its own computation would lose it in the swap: say which stay float
        warnings.warn("quantize_model leaves these Conv2d/Linear subclasses float (their forward computes something "
                      "else than the parent's, or they hold more than weight and bias): "
                      + ", ".join(f"{n!r} ({c})" for n, c in left_float.items()), stacklevel=2)
    if not layers or "" in layers:
        raise CifarpressError("the model has no Conv2d or Linear inside it to quantize; "
                              "pass a network, not a single layer")
    keep = default_keep(layers) if config.keep is None else config.keep
    unknown = [name for name in keep if name not in layers]
    if unknown:
        raise CifarpressError(f"TernaryConfig.keep names {unknown[0]!r}, which is not a Conv2d/Linear layer of "
                              f"this model; use names from: {', '.join(layers)}")
    precisions = {}
    for name, layer in layers.items():
        precision = "int8" if name in keep else "ternary"
        new = QUANTIZED_TYPES[precision, _float_base(layer)].from_float(layer, config, name)
        _replace_module(model, name, new)
        precisions[name] = precision
    return precisions


def config_from_model(model: nn.Module) -> TernaryConfig:
    """The TernaryConfig that rebuilds this quantized model's layers (warm-up left out: it only matters in training).

    keep lists every layer that is not ternary now, whatever its width: those get the
    absmax rule, and loading the state dict then restores each one's `weight_bits`.
    """
    layers = quantized_layers(model)
    if not layers:
        raise CifarpressError("the model has no ternary or int8 layers; quantize it with quantize_model first")
    ternary = [m for m in layers.values() if m.ternary]
    ref = ternary[0] if ternary else next(iter(layers.values()))
    return TernaryConfig(
        scale=ref.scale_method, granularity="channel" if ref.per_channel else "tensor",
        act_bits=ref.act_bits, act_granularity="sample" if ref.act_per_sample else "tensor",
        keep=[n for n, m in layers.items() if not m.ternary])


def set_warmup_blend(model: nn.Module, blend: float) -> None:
    for layer in quantized_layers(model).values():
        layer.blend = float(blend)


@torch.no_grad()
def calibrate_activations(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor],
                          batch_size: int = 250) -> None:
    """Set each int8-input layer's static range to the largest |input| seen on `images` (normalized inputs)."""
    layers = [m for m in quantized_layers(model).values() if m.act_bits]
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    was_training = model.training
    model.eval()  # BN uses its running statistics; only the range observers update
    for layer in layers:
        layer.act_absmax.zero_()
        layer._calibrating = True
    try:
        for batch in batches:
            model(batch)
    finally:
        for layer in layers:
            layer._calibrating = False
        model.train(was_training)


def weight_bytes(layer: FakeQuantLayer) -> int:
    """The bytes the packed format spends on this layer's codes (scales not included)."""
    count = layer.weight.numel()
    if layer.ternary:
        return math.ceil(count / 4)  # 2-bit codes, four per byte
    return math.ceil(count * layer.bits / 8)  # int8 one byte each; other widths bit-packed


@torch.no_grad()
def layer_report(model: nn.Module) -> list[dict]:
    """Per quantized layer: name, precision, bits, params, zero_fraction (free sparsity), scale, weight_bytes;
    fixed-point layers (AdaPT) add frac_bits and input_bits."""
    rows = []
    for name, layer in quantized_layers(model).items():
        codes, scale = layer.weight_codes(), layer.weight_scale().float().flatten()
        rows.append({
            "name": name, "precision": layer.precision, "bits": round(layer.bits, 2),
            "params": codes.numel(), "zero_fraction": float((codes == 0).float().mean()),
            "scale": float(scale[0]) if scale.numel() == 1 else scale.tolist(),
            "weight_bytes": weight_bytes(layer),  # as packed
            "act_bits": layer.act_bits,
            **({"frac_bits": layer.frac_bits, "input_bits": layer.input_bits} if layer.fixed_point else {}),
        })
    return rows
