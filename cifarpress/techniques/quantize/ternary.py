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

Warm-up: over `warmup_steps` optimizer steps the training forward moves from the
float weights (blend 0) to the quantized ones (blend 1). Evaluation always sees
the fully quantized weights, so every reported accuracy is the deployable one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.utils.modules import unwrap

EPS = 1e-5  # lower bound of every scale (BitNet's clamp), guards all-zero tensors
ACT_MOMENTUM = 0.1  # running-absmax update rate, the BN convention
INT8_MAX = 127
TERNARY_BITS = math.log2(3)  # information content of one ternary weight, the "1.58"

SCALES = ("absmean", "absmedian")
GRANULARITIES = ("tensor", "channel")
ACT_BITS = (None, 8)
ACT_GRANULARITIES = ("tensor", "sample")


# -- the numerics, as plain functions ------------------------------------------------

def round_clip(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """RoundClip of the BitNet papers: round to nearest (ties to even), then clamp."""
    return x.round().clamp(low, high)


def _per_channel_view(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.view(-1, *([1] * (ndim - 1)))


def ternary_scale(weight: torch.Tensor, method: str = "absmean", per_channel: bool = False,
                  eps: float = EPS) -> torch.Tensor:
    """mean|W| or median|W|: a 0-d tensor, or one value per output channel shaped to broadcast."""
    magnitude = weight.detach().abs()
    if per_channel:
        rows = magnitude.flatten(1)
        stat = rows.mean(1) if method == "absmean" else rows.median(1).values
        stat = _per_channel_view(stat, weight.dim())
    else:
        stat = magnitude.mean() if method == "absmean" else magnitude.median()
    return stat.clamp_min(eps)


def int8_weight_scale(weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Symmetric per-output-channel scale absmax / 127."""
    absmax = weight.detach().abs().flatten(1).amax(1)
    return _per_channel_view(absmax / INT8_MAX, weight.dim()).clamp_min(eps)


def activation_scale(x: torch.Tensor, per_sample: bool, eps: float = EPS) -> torch.Tensor:
    """Dynamic absmax / 127 of the whole batch, or of each image (shaped to broadcast)."""
    magnitude = x.detach().abs()
    if per_sample:
        absmax = magnitude.amax(dim=tuple(range(1, x.dim())), keepdim=True)
    else:
        absmax = magnitude.amax()
    return (absmax / INT8_MAX).clamp_min(eps)


def straight_through(latent: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Return `value` in the forward pass; in the backward pass, pass the gradient unchanged to `latent`.

    This computes the same gradient as the usual latent + (value - latent).detach(),
    but in the rearranged form value + (latent - latent.detach()) the added term is
    exactly zero. The forward pass therefore returns `value` bit for bit, so
    training, evaluation, the packed file and the exported graph all see the same
    numbers.
    """
    if not (torch.is_grad_enabled() and latent.requires_grad):
        return value
    return value.detach() + (latent - latent.detach())


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize with an STE, saturating like ONNX QuantizeLinear."""
    with torch.no_grad():
        quantized = round_clip(x / scale, -128, 127) * scale
    return straight_through(x, quantized)


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

class FakeQuantLayer:
    """Mix-in for a Conv2d/Linear whose forward sees fake-quantized weights (and, optionally, inputs).

    `weight` stays the fp32 latent weight that the optimizer updates. After
    `freeze()` or `load_quantized()` the layer is in deployed form: the latent
    weight equals the dequantized one and the scale is pinned. The scale has to be
    pinned because mean|Wq| is not the s that produced Wq, so recomputing it would
    change the codes.
    """

    precision: str  # "ternary" | "int8"
    qmax: int  # codes lie in [-qmax, qmax]
    _float_type: type

    def _init_fake_quant(self, config: TernaryConfig, name: str = "") -> None:
        self.layer_name = name
        self.scale_method = config.scale
        self.per_channel = config.granularity == "channel"
        self.act_bits = config.act_bits
        self.act_per_sample = config.act_granularity == "sample"
        self.blend = 1.0  # warm-up: 0 = float weights, 1 = quantized (training forward only)
        self._calibrating = False
        self.register_buffer("frozen_scale", None)
        absmax = torch.zeros((), device=self.weight.device) if self.act_bits else None
        self.register_buffer("act_absmax", absmax)  # running input range; in checkpoints for resume

    @classmethod
    def from_float(cls, layer: nn.Module, config: TernaryConfig | None = None, name: str = ""):
        """A quantized copy of a float `layer`: same hyper-parameters, copied weights, device and memory format."""
        new = cls(**cls._hyperparameters(layer), config=config or TernaryConfig(), name=name)
        new.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        return new.train(layer.training)

    def to_float(self) -> nn.Module:
        """A plain layer that holds the dequantized weights. The export traces this, without any quantizer ops."""
        plain = self._float_type(**self._hyperparameters(self))
        plain.weight = nn.Parameter(self.quantized_weight().clone())
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().clone())
        return plain.train(self.training)

    # weights
    def _scale_from(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_scale(self) -> torch.Tensor:
        """The pinned scale in deployed form; otherwise the scale the latent weights give."""
        if self.frozen_scale is not None:
            return self.frozen_scale
        return self._scale_from(self.weight.detach())

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """Integer-valued float tensor in [-qmax, qmax]: {-1, 0, 1} for ternary layers."""
        return round_clip(self.weight / self.weight_scale(), -self.qmax, self.qmax)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        return self.weight_codes() * self.weight_scale()

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses. Its gradient reaches the latent weight unchanged (STE)."""
        target = self.quantized_weight()
        if self.training and self.blend < 1.0:
            # lerp is exact at both ends, so blend 0 is the float layer and blend 1 the quantized one
            target = torch.lerp(self.weight.detach(), target, self.blend)
        return straight_through(self.weight, target)

    @torch.no_grad()
    def load_quantized(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Put the layer in deployed form: latent weight = codes * scale, scale pinned."""
        if codes.shape != self.weight.shape:
            raise CifarpressError(f"layer {self.layer_name!r} expects weights of shape {tuple(self.weight.shape)}, "
                                  f"got {tuple(codes.shape)}; the file does not fit this architecture")
        scale = scale.to(self.weight.device, torch.float32)
        self.weight.copy_(codes.to(self.weight.device, torch.float32) * scale)
        self.frozen_scale = scale.clone()

    def freeze(self) -> None:
        """Switch to deployed form, keeping the current codes and scale."""
        scale = self.weight_scale().clone()
        self.load_quantized(self.weight_codes(), scale)

    # inputs
    def static_input_scale(self) -> torch.Tensor:
        """The per-tensor activation scale that evaluation and the exported graph use."""
        if float(self.act_absmax) <= 0.0:
            raise CifarpressError(
                f"layer {self.layer_name!r} has no activation range yet; train with act_bits=8 or run "
                f"calibrate_activations(model, images) before evaluating or exporting")
        return (self.act_absmax / INT8_MAX).clamp_min(EPS)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        if not (self.training or self._calibrating):
            return fake_quantize_activation(x, self.static_input_scale())
        with torch.no_grad():
            seen = x.detach().abs().amax().float()
            if self._calibrating:
                self.act_absmax.copy_(torch.maximum(self.act_absmax, seen))
            else:
                # the first batch sets the range, and later batches move it by ACT_MOMENTUM
                self.act_absmax.copy_(torch.where(self.act_absmax > 0,
                                                  torch.lerp(self.act_absmax, seen, ACT_MOMENTUM), seen))
        return fake_quantize_activation(x, activation_scale(x, self.act_per_sample))

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self.precision == "ternary":
            base += f", scale={self.scale_method}/{'channel' if self.per_channel else 'tensor'}"
        if self.act_bits:
            base += f", act_bits={self.act_bits}/{'sample' if self.act_per_sample else 'tensor'}"
        return base + (", deployed" if self.frozen_scale is not None else "")


class _TernaryWeights(FakeQuantLayer):
    precision = "ternary"
    qmax = 1

    def _scale_from(self, weight: torch.Tensor) -> torch.Tensor:
        return ternary_scale(weight, self.scale_method, self.per_channel)


class _Int8Weights(FakeQuantLayer):
    precision = "int8"
    qmax = INT8_MAX

    def _scale_from(self, weight: torch.Tensor) -> torch.Tensor:
        return int8_weight_scale(weight)


def _conv_hyperparameters(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)


def _linear_hyperparameters(linear: nn.Linear) -> dict:
    return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)


class _FakeQuantConv2d(FakeQuantLayer, nn.Conv2d):
    _float_type = nn.Conv2d
    _hyperparameters = staticmethod(_conv_hyperparameters)

    def __init__(self, *args, config: TernaryConfig | None = None, name: str = "", **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_fake_quant(config or TernaryConfig(), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.bias)


class _FakeQuantLinear(FakeQuantLayer, nn.Linear):
    _float_type = nn.Linear
    _hyperparameters = staticmethod(_linear_hyperparameters)

    def __init__(self, *args, config: TernaryConfig | None = None, name: str = "", **kwargs):
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_fake_quant(config or TernaryConfig(), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.effective_weight(), self.bias)


class TernaryConv2d(_TernaryWeights, _FakeQuantConv2d):
    """Conv2d with BitNet b1.58 ternary weights {-s, 0, s}."""


class TernaryLinear(_TernaryWeights, _FakeQuantLinear):
    """Linear with BitNet b1.58 ternary weights {-s, 0, s}."""


class Int8Conv2d(_Int8Weights, _FakeQuantConv2d):
    """Conv2d with symmetric per-output-channel int8 weights (kept layers)."""


class Int8Linear(_Int8Weights, _FakeQuantLinear):
    """Linear with symmetric per-output-channel int8 weights (kept layers)."""


QUANTIZED_TYPES = {
    ("ternary", nn.Conv2d): TernaryConv2d, ("ternary", nn.Linear): TernaryLinear,
    ("int8", nn.Conv2d): Int8Conv2d, ("int8", nn.Linear): Int8Linear,
}


# -- swapping and inspecting a model ----------------------------------------------------

def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Plain nn.Conv2d / nn.Linear modules by path. Exact types only: a subclass may have its own forward."""
    return {name: m for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}


def quantized_layers(model: nn.Module) -> dict[str, FakeQuantLayer]:
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, FakeQuantLayer)}


def default_keep(layers: dict[str, nn.Module]) -> list[str]:
    """The first conv and the classifier (the last Linear, or the last conv of an all-conv net)."""
    convs = [n for n, m in layers.items() if type(m) is nn.Conv2d]
    linears = [n for n, m in layers.items() if type(m) is nn.Linear]
    keep = convs[:1] + (linears[-1:] or convs[-1:])
    return list(dict.fromkeys(keep))  # a one-conv model names it once


def _replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)


def quantize_model(model: nn.Module, config: TernaryConfig | None = None) -> dict[str, str]:
    """Swap every Conv2d/Linear of `model` in place; returns {layer name: "ternary" | "int8"}."""
    config = config or TernaryConfig()
    model = unwrap(model)
    if quantized_layers(model):
        raise CifarpressError("the model already holds quantized layers; pass the float model to quantize_model")
    layers = quantizable_layers(model)
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
        new = QUANTIZED_TYPES[precision, type(layer)].from_float(layer, config, name)
        _replace_module(model, name, new)
        precisions[name] = precision
    return precisions


def config_from_model(model: nn.Module) -> TernaryConfig:
    """The TernaryConfig that rebuilds this quantized model's layers (warm-up left out: it only matters in training)."""
    layers = quantized_layers(model)
    if not layers:
        raise CifarpressError("the model has no ternary or int8 layers; quantize it with quantize_model first")
    ternary = [m for m in layers.values() if m.precision == "ternary"]
    ref = ternary[0] if ternary else next(iter(layers.values()))
    return TernaryConfig(
        scale=ref.scale_method, granularity="channel" if ref.per_channel else "tensor",
        act_bits=ref.act_bits, act_granularity="sample" if ref.act_per_sample else "tensor",
        keep=[n for n, m in layers.items() if m.precision == "int8"])


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


@torch.no_grad()
def layer_report(model: nn.Module) -> list[dict]:
    """Per quantized layer: name, precision, bits, params, zero_fraction (free sparsity), scale, weight_bytes."""
    rows = []
    for name, layer in quantized_layers(model).items():
        codes, scale = layer.weight_codes(), layer.weight_scale().float().flatten()
        ternary = layer.precision == "ternary"
        rows.append({
            "name": name, "precision": layer.precision, "bits": round(TERNARY_BITS, 2) if ternary else 8,
            "params": codes.numel(), "zero_fraction": float((codes == 0).float().mean()),
            "scale": float(scale[0]) if scale.numel() == 1 else scale.tolist(),
            "weight_bytes": math.ceil(codes.numel() / 4) if ternary else codes.numel(),  # as packed
            "act_bits": layer.act_bits,
        })
    return rows
