"""Fake-quant Conv2d/Linear layers whose weight bit width is per-layer state.

One layer type serves every weight precision. The precision is not the class:
it is the 0-d integer buffer `weight_bits` of each layer, so a technique that
picks a width per layer during training (AdaPT's adaptive fixed point moves each
layer between 2 and 16 bits) changes it with `set_weight_bits` while the layer
keeps its parameters, its optimizer state and its place in the model. Being a
buffer, the width travels with everything that already carries the state dict:
model files, trainer checkpoints, the EMA copy (which copies integer buffers in
place) and DistributedDataParallel's buffer broadcast.

Two weight rules exist, and the buffer says which one a layer uses:

    ternary (weight_bits = 0, the marker)   codes {-1, 0, 1}, scale mean|W| or
        median|W| per tensor or per output channel (BitNet b1.58). Its width,
        log2(3) = 1.58 bits, is not an integer, and its scale is not absmax, so it
        is a rule of its own rather than "2 bits".
    n-bit (weight_bits = b, 2 <= b <= 32)   symmetric codes in [-qmax, qmax],
        qmax = 2^(b-1) - 1, zero point 0, scale absmax / qmax per output channel.
        b = 8 is the int8 rule of the layers a ternary policy keeps. b = 2 gives
        codes {-1, 0, 1} too, but on an absmax grid, which rounds most weights to 0.
    fixed point <b, f> (weight_bits = b and the 0-d buffer weight_frac_bits = f)
        the same symmetric b-bit codes, but the scale is the fixed-point step
        2^-f for the whole tensor (AdaPT's word length b, fractional length f).
        Scaling by a power of two is exact in float, so the codes are exact at any
        width; training may round them stochastically (stochastic_rounding, with a
        generator the technique seeds per step so that resumed runs repeat).

Input fake quant (act_bits=8) applies only while the layer's weights fit int8
(ternary or b <= 8): a wider layer exports as a float layer (export/qdq.py), so
its inputs stay float too, while the running range keeps updating in training,
ready for when a technique narrows the layer. A fixed-point layer may instead
round its input to its own <b, f> format (the 0-d bool buffer input_fixed_point,
AdaPT's quantized inputs), to nearest, with a straight-through gradient; the
export writes that rounding as Mul, Round, Clip, Mul.

The -2^(b-1) code is left out so that the grid is symmetric, which is what
TensorRT's explicit quantization takes and what makes BN folding exact (a
per-channel factor only rescales, or flips, the codes).

Everything else (the straight-through estimator, the warm-up blend, the int8
activation fake quant with its running range, freeze/load_quantized and the
deployed form) does not depend on the weight rule and works as described in
ternary.py, which holds the policy that decides which layer gets which rule.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cifarpress.errors import CifarpressError

EPS = 1e-5  # lower bound of the ternary and int8 scales (BitNet's clamp), guards all-zero tensors
ACT_MOMENTUM = 0.1  # running-absmax update rate, the BN convention
INT8_MAX = 127
TERNARY_BITS = math.log2(3)  # information content of one ternary weight, the "1.58"
TERNARY = 0  # the weight_bits value that marks the ternary rule
MIN_BITS, MAX_BITS = 2, 32  # 1 bit would leave qmax = 0; 32 covers AdaPT's words
INT8_BITS = 8  # the widest weights an int8 QDQ layer (and so an int8 input) takes
MAX_FRAC_BITS = 48  # fixed point: fractional lengths 0..48 (steps down to 2^-48)


# -- the numerics, as plain functions ------------------------------------------------

def round_clip(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """RoundClip of the BitNet papers: round to nearest (ties to even), then clamp."""
    return x.round().clamp(low, high)


def _per_channel_view(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.view(-1, *([1] * (ndim - 1)))


def qmax_for(bits: int) -> int:
    """The largest code of the symmetric n-bit grid (1 for the ternary marker)."""
    return 1 if bits == TERNARY else 2 ** (bits - 1) - 1


def fixed_point_round(x: torch.Tensor, bits: int, frac_bits: int) -> torch.Tensor:
    """Round to nearest on the <bits, frac_bits> fixed-point grid: symmetric codes times 2^-frac_bits."""
    qmax, step = qmax_for(bits), 2.0 ** -frac_bits
    return round_clip(x / step, -qmax, qmax) * step


def check_bits(bits, where: str = "weight_bits") -> int:
    """`bits` as the int the buffer holds: "ternary", "int<b>" or b with 2 <= b <= 32."""
    if isinstance(bits, str):
        text = bits.strip().lower()
        if text == "ternary":
            return TERNARY
        bits = int(text[3:]) if text.startswith("int") and text[3:].isdigit() else bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits == TERNARY or MIN_BITS <= bits <= MAX_BITS):
        raise CifarpressError(f"{where}={bits!r} is not a weight precision; use 'ternary' or a whole number of "
                              f"bits from {MIN_BITS} to {MAX_BITS}")
    return bits


def precision_name(bits: int) -> str:
    """"ternary" or "int<b>" ("int8" for the kept layers of a ternary policy)."""
    return "ternary" if bits == TERNARY else f"int{bits}"


def ternary_scale(weight: torch.Tensor, method: str = "absmean", per_channel: bool = False,
                  eps: float = EPS) -> torch.Tensor:
    """mean|W| or median|W| over the nonzero weights: a 0-d tensor, or one value per output channel shaped to
    broadcast.

    Exact zeros are left out so that the scale is the same before and after a pruner cuts its zeroed channels
    out: gating or HESSO in the same pass as the ternary QAT would otherwise hand on a cut model whose scales,
    and so whose function, differ from the trained one. (Trained float weights are never exactly zero else.)"""
    rows = weight.detach().abs().flatten(1) if per_channel else weight.detach().abs().reshape(1, -1)
    nonzero = rows != 0
    if method == "absmean":
        stat = rows.sum(1) / nonzero.sum(1).clamp_min(1)
    else:  # nanmedian skips the zeros; a row of zeros gives nan, then the floor
        stat = torch.nan_to_num(rows.masked_fill(~nonzero, float("nan")).nanmedian(1).values, nan=0.0)
    stat = _per_channel_view(stat, weight.dim()) if per_channel else stat.reshape(())
    return stat.clamp_min(eps)


def absmax_scale(weight: torch.Tensor, qmax: int, per_channel: bool = True, eps: float | None = None) -> torch.Tensor:
    """Symmetric n-bit scale absmax / qmax, per output channel (shaped to broadcast) or as a 0-d tensor.

    The default floor is EPS at 8 bits and scales with 1 / qmax: it bounds absmax
    (at 127 * EPS) rather than the step, so a wide grid keeps all its codes on
    small weights (a fixed EPS would cap a 16-bit layer with absmax < 0.33 below qmax).
    """
    eps = EPS * (INT8_MAX / qmax) if eps is None else eps  # exactly EPS for int8: 127 / 127 is 1.0
    magnitude = weight.detach().abs()
    if per_channel:
        return _per_channel_view(magnitude.flatten(1).amax(1) / qmax, weight.dim()).clamp_min(eps)
    return (magnitude.amax() / qmax).clamp_min(eps)


def int8_weight_scale(weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Symmetric per-output-channel scale absmax / 127."""
    return absmax_scale(weight, INT8_MAX, per_channel=True, eps=eps)  # the floor as ever: EPS itself


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


# -- the layers ---------------------------------------------------------------------

class QuantSettings(Protocol):
    """What a layer reads from its policy (ternary.TernaryConfig is one)."""

    scale: str  # the ternary rule's statistic: "absmean" | "absmedian"
    granularity: str  # the ternary rule's scale: "tensor" | "channel"
    act_bits: int | None
    act_granularity: str  # "tensor" | "sample"


class FakeQuantLayer:
    """Mix-in for a Conv2d/Linear whose forward sees fake-quantized weights (and, optionally, inputs).

    `weight` stays the fp32 latent weight that the optimizer updates. After
    `freeze()` or `load_quantized()` the layer is in deployed form: the latent
    weight equals the dequantized one and the scale is pinned. The scale has to be
    pinned because mean|Wq| is not the s that produced Wq, so recomputing it would
    change the codes.
    """

    _float_type: type
    initial_bits: int | str = 8  # the width a new layer starts at; subclasses name a policy's default

    def _init_fake_quant(self, config: QuantSettings | None = None, name: str = "", weight_bits=None) -> None:
        self.layer_name = name
        self.scale_method = getattr(config, "scale", "absmean")
        self.per_channel = getattr(config, "granularity", "tensor") == "channel"
        self.act_bits = getattr(config, "act_bits", None)
        self.act_per_sample = getattr(config, "act_granularity", "tensor") == "sample"
        self.blend = 1.0  # warm-up: 0 = float weights, 1 = quantized (training forward only)
        self._calibrating = False
        self._ints_seen = {}  # buffer name -> (buffer, its version, its value): see _read_int
        self.stochastic_rounding = False  # fixed point, training forward only
        self.rounding_generator: torch.Generator | None = None
        bits = check_bits(self.initial_bits if weight_bits is None else weight_bits)
        self.register_buffer("weight_bits", torch.tensor(bits, dtype=torch.int64, device=self.weight.device))
        self.register_buffer("frozen_scale", None)
        self.register_buffer("weight_frac_bits", None)  # set by set_fixed_point: the fixed-point rule
        self.register_buffer("input_fixed_point", None)  # set by set_fixed_inputs: inputs in the layer's format
        absmax = torch.zeros((), device=self.weight.device) if self.act_bits else None
        self.register_buffer("act_absmax", absmax)  # running input range; in checkpoints for resume

    @classmethod
    def from_float(cls, layer: nn.Module, config: QuantSettings | None = None, name: str = "", weight_bits=None):
        """A quantized copy of a float `layer`: same hyper-parameters, copied weights, device and memory format."""
        new = cls(**cls._hyperparameters(layer), config=config, name=name, weight_bits=weight_bits)
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

    # the precision, from the buffers
    def _read_int(self, name: str) -> int | None:
        # Reading a CUDA buffer is a device sync, once per layer and forward, so the value is
        # re-read only when the buffer changed: every in-place write (set_weight_bits, load_state_dict,
        # the EMA's copy_, DDP's broadcast) bumps the tensor's version, and .to() replaces the tensor.
        buffer = getattr(self, name)
        if buffer is None:
            return None
        try:
            version = buffer._version
        except RuntimeError:  # an inference tensor keeps no version counter
            return int(buffer)
        seen = self._ints_seen.get(name)
        if seen is None or seen[0] is not buffer or seen[1] != version:
            seen = self._ints_seen[name] = (buffer, version, int(buffer))
        return seen[2]

    def _bits(self) -> int:
        return self._read_int("weight_bits")

    @property
    def frac_bits(self) -> int | None:
        """The fractional length f of a fixed-point layer (its step is 2^-f); None under the other rules."""
        return self._read_int("weight_frac_bits")

    @property
    def fixed_point(self) -> bool:
        return self.weight_frac_bits is not None

    @property
    def int8_inputs(self) -> bool:
        """Whether the input passes through int8 fake quant now: act_bits=8 and weights that fit int8."""
        return bool(self.act_bits) and self._bits() <= INT8_BITS and not self.fixed_inputs

    @property
    def fixed_inputs(self) -> bool:
        """Whether the input is rounded to the layer's own fixed-point format."""
        return bool(self._read_int("input_fixed_point")) and self.fixed_point

    @property
    def input_bits(self) -> float:
        """Bits per input value: 8 (int8), the word length (fixed point) or 32 (float)."""
        return 8 if self.int8_inputs else self._bits() if self.fixed_inputs else 32

    @torch.no_grad()
    def set_fixed_inputs(self, on: bool = True) -> None:
        if not self.fixed_point:
            raise CifarpressError(f"layer {self.layer_name!r} has no fixed-point format for its inputs; call "
                                  f"set_fixed_point first")
        if self.input_fixed_point is None:
            self.input_fixed_point = torch.tensor(bool(on), device=self.weight.device)
        else:
            self.input_fixed_point.fill_(bool(on))

    @property
    def ternary(self) -> bool:
        return self._bits() == TERNARY

    @property
    def precision(self) -> str:
        """"ternary" or "int<b>"."""
        return precision_name(self._bits())

    @property
    def bits(self) -> float:
        """Bits per weight: log2(3) for ternary, b for n-bit."""
        bits = self._bits()
        return TERNARY_BITS if bits == TERNARY else bits

    @property
    def qmax(self) -> int:
        """Codes lie in [-qmax, qmax]."""
        return qmax_for(self._bits())

    @torch.no_grad()
    def set_weight_bits(self, bits) -> None:
        """Switch the weight rule at runtime: "ternary", "int<b>" or b in 2..16 bits.

        A deployed layer leaves deployed form when the width changes: its pinned
        scale belongs to the old grid. The latent weights (the dequantized old ones)
        are then quantized afresh on the new grid.
        """
        bits = check_bits(bits, f"layer {self.layer_name!r}: weight_bits")
        if bits != self._bits() or self.fixed_point:
            self.weight_bits.fill_(bits)
            self.weight_frac_bits = None
            self.frozen_scale = None

    @torch.no_grad()
    def set_fixed_point(self, word_bits: int, frac_bits: int) -> None:
        """Switch to the fixed-point rule <word_bits, frac_bits>: codes in [-qmax, qmax] times 2^-frac_bits.

        Both numbers change in place, so the EMA copy and DDP's broadcast follow (see set_weight_bits).
        """
        word_bits = check_bits(word_bits, f"layer {self.layer_name!r}: word length")
        if word_bits == TERNARY:
            raise CifarpressError(f"layer {self.layer_name!r}: a fixed-point word needs {MIN_BITS} to {MAX_BITS} bits")
        if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= MAX_FRAC_BITS:
            raise CifarpressError(f"layer {self.layer_name!r}: fractional length {frac_bits!r} is invalid; use a "
                                  f"whole number from 0 to {MAX_FRAC_BITS}")
        if word_bits == self._bits() and frac_bits == self.frac_bits:
            return
        self.weight_bits.fill_(word_bits)
        if self.weight_frac_bits is None:
            self.weight_frac_bits = torch.tensor(frac_bits, dtype=torch.int64, device=self.weight.device)
        else:
            self.weight_frac_bits.fill_(frac_bits)
        self.frozen_scale = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a fixed-point layer's state: take its rule before the values load into it
        if self.weight_frac_bits is None and prefix + "weight_frac_bits" in state_dict:
            self.weight_frac_bits = torch.zeros((), dtype=torch.int64, device=self.weight.device)
        if self.input_fixed_point is None and prefix + "input_fixed_point" in state_dict:
            self.input_fixed_point = torch.zeros((), dtype=torch.bool, device=self.weight.device)
        key = prefix + "weight_bits"
        absent = key not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if absent and key in missing_keys:
            missing_keys.remove(key)  # a file from before per-layer widths: the policy's width stands
        elif not absent:
            try:
                check_bits(int(self.weight_bits), f"{key}")
            except CifarpressError as exc:
                error_msgs.append(str(exc))

    # weights
    def _scale_from(self, weight: torch.Tensor) -> torch.Tensor:
        if self.fixed_point:
            return torch.full((), 2.0 ** -self.frac_bits, device=weight.device)
        if self.ternary:
            return ternary_scale(weight, self.scale_method, self.per_channel)
        return absmax_scale(weight, self.qmax)

    def weight_scale(self) -> torch.Tensor:
        """The pinned scale in deployed form; otherwise the scale the latent weights give."""
        if self.frozen_scale is not None:
            return self.frozen_scale
        return self._scale_from(self.weight.detach())

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """Integer-valued float tensor in [-qmax, qmax]: {-1, 0, 1} for ternary layers."""
        qmax = self.qmax
        return round_clip(self.weight / self.weight_scale(), -qmax, qmax)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        return self.weight_codes() * self.weight_scale()

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses. Its gradient reaches the latent weight unchanged (STE)."""
        if self.training and self.stochastic_rounding and self.fixed_point:
            target = self._stochastic_weight()
        else:
            target = self.quantized_weight()
        if self.training and self.blend < 1.0:
            # lerp is exact at both ends, so blend 0 is the float layer and blend 1 the quantized one
            target = torch.lerp(self.weight.detach(), target, self.blend)
        return straight_through(self.weight, target)

    @torch.no_grad()
    def _stochastic_weight(self) -> torch.Tensor:
        """Fixed-point codes rounded up with probability equal to the remainder (unbiased), times the step."""
        scale, qmax = self.weight_scale(), self.qmax
        scaled = self.weight / scale
        noise = torch.rand(scaled.shape, generator=self.rounding_generator, device=scaled.device)
        return (scaled + noise).floor_().clamp_(-qmax, qmax) * scale

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
        if self.fixed_inputs:
            with torch.no_grad():
                rounded = fixed_point_round(x, self._bits(), self.frac_bits)
            return straight_through(x, rounded)
        if self.act_bits is None:
            return x
        active = self.int8_inputs
        if not (self.training or self._calibrating):
            return fake_quantize_activation(x, self.static_input_scale()) if active else x
        with torch.no_grad():
            seen = x.detach().abs().amax().float()
            if self._calibrating:
                self.act_absmax.copy_(torch.maximum(self.act_absmax, seen))
            else:
                # the first batch sets the range, and later batches move it by ACT_MOMENTUM
                self.act_absmax.copy_(torch.where(self.act_absmax > 0,
                                                  torch.lerp(self.act_absmax, seen, ACT_MOMENTUM), seen))
        return fake_quantize_activation(x, activation_scale(x, self.act_per_sample)) if active else x

    def extra_repr(self) -> str:
        base = super().extra_repr() + f", weights={self.precision}"
        if self.fixed_point:
            base += f", frac_bits={self.frac_bits}" + (", fixed-point inputs" if self.fixed_inputs else "")
        if self.ternary:
            base += f", scale={self.scale_method}/{'channel' if self.per_channel else 'tensor'}"
        if self.act_bits:
            base += f", act_bits={self.act_bits}/{'sample' if self.act_per_sample else 'tensor'}"
        return base + (", deployed" if self.frozen_scale is not None else "")


def _conv_hyperparameters(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)


def _linear_hyperparameters(linear: nn.Linear) -> dict:
    return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)


class FakeQuantConv2d(FakeQuantLayer, nn.Conv2d):
    """Conv2d with fake-quantized weights of the layer's own precision (`weight_bits`)."""

    _float_type = nn.Conv2d
    _hyperparameters = staticmethod(_conv_hyperparameters)

    def __init__(self, *args, config: QuantSettings | None = None, name: str = "", weight_bits=None, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_fake_quant(config, name, weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.bias)


class FakeQuantLinear(FakeQuantLayer, nn.Linear):
    """Linear with fake-quantized weights of the layer's own precision (`weight_bits`)."""

    _float_type = nn.Linear
    _hyperparameters = staticmethod(_linear_hyperparameters)

    def __init__(self, *args, config: QuantSettings | None = None, name: str = "", weight_bits=None, **kwargs):
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_fake_quant(config, name, weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.effective_weight(), self.bias)
