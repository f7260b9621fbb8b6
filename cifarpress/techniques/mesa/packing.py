"""The numerics of Mesa's saved-activation storage: per-group 8-bit codes and 1-bit masks.

A saved activation is flattened in its *memory* order (so a channels_last tensor's groups run
across the channels of one pixel, where values are alike, and no copy is made to reorder it),
cut into groups of `group_size` elements, and each group stored as uint8 codes with its own
asymmetric range: x ~ low + scale * code. The range is the group's own min and max, taken when the
tensor is saved. Mesa (Pan et al., arXiv 2111.11124) keeps running min/max estimates per layer
instead (momentum 0.9); that needs state tied to which op saved which tensor, which a generic
saved-tensor hook does not know, and it clips whatever falls outside the running range. The
exact range costs one min/max pass and can never clip.

`low` and `scale` are stored in fp16 (4 bytes a group: 1.6% on top of the codes at 256 elements);
the codes are computed against the fp16-rounded values, so that rounding moves no element by more
than one step. Stochastic rounding (floor(v + u), u ~ U[0, 1)) makes each code an unbiased
estimate of the value, so the errors of many saved tensors average out in the weight gradients
instead of adding up as round-to-nearest's bias would. The noise u is a fixed 64K-value pattern
shifted by one fresh uniform draw per tensor (modulo 1): each element's u is still exactly uniform,
but a tensor costs one random number instead of one per element (on the CPU, torch.rand over an
activation costs as much as the conv that made it). Groups a pattern apart share their noise within
one tensor; that correlates errors, it does not bias them.
"""
from __future__ import annotations

from dataclasses import dataclass

import math
import os
import sys
import warnings

import torch

# The mask packing reads bytes as int64 words: little-endian, as on x86 and ARM.
assert sys.byteorder == "little", "cifarpress's Mesa mask packing assumes a little-endian machine"

LEVELS = 255  # 8-bit codes 0..255


def memory_order(t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A 1-D view of `t` in memory order without copying where its layout allows, and the layout name."""
    if t.is_contiguous():
        return t.reshape(-1), "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1), "channels_last"
    return t.contiguous().reshape(-1), "contiguous"  # rare odd strides: stored (and handed back) contiguous


def restore_layout(flat: torch.Tensor, shape: torch.Size, layout: str) -> torch.Tensor:
    """Inverse of memory_order: a tensor of `shape` with the saved tensor's memory format."""
    if layout == "channels_last":
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


@dataclass
class QuantizedTensor:
    """One saved activation at 8 bits a value (plus a range per group)."""

    codes: torch.Tensor  # uint8, (groups, group_size), the last group zero-padded
    low: torch.Tensor  # fp16, (groups, 1)
    scale: torch.Tensor  # fp16, (groups, 1)
    shape: torch.Size
    layout: str
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.low, self.scale))


def _dither(group_size: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Rounding noise for one tensor: a fixed (rows, group_size) pattern shifted by one fresh uniform
    draw, modulo 1. Every element's noise is exactly U[0, 1) (so each code is unbiased), at the cost of
    one random number a tensor instead of one an element (torch.rand costs as much as a conv here)."""
    key = (group_size, str(device))
    if key not in _DITHER_BANKS:
        rows = max(1, 2**16 // group_size)
        _DITHER_BANKS[key] = torch.rand(rows, group_size, generator=torch.Generator().manual_seed(0)).to(device)
    shift = torch.rand(1, generator=generator, device=device)
    return (_DITHER_BANKS[key] + shift).frac_()


_DITHER_BANKS: dict = {}


def _encode(groups: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """groups (k, rows, group_size) fp32 and noise (rows, group_size) -> codes, low, scale (fp16, one a group).
    floor((x - low) / scale + u): the uint8 cast truncates, which is floor for these non-negative values."""
    low = groups.amin(2, keepdim=True).half()
    high = groups.amax(2, keepdim=True)
    # A constant group has no range: any positive scale stores it exactly (every code 0).
    scale = ((high - low.float()) / LEVELS).clamp_min(1e-7).half()
    scaled = (groups - low.float()) / scale.float() + noise
    return scaled.clamp(0, LEVELS).to(torch.uint8), low, scale


def _decode(codes: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + low.float()


class _Kernels:
    """_encode and _decode fused by torch.compile where it works: one pass over the activation instead
    of six (4x faster on a 2-core CPU, after a one-off ~20 s compile per process; dynamic shapes, so a
    new activation size does not compile again). Any compile failure falls back to eager, once, with a
    warning. CIFARPRESS_MESA_COMPILE=0 keeps eager."""

    def __init__(self):
        self.encode, self.decode = _encode, _decode
        self.compiled = os.environ.get("CIFARPRESS_MESA_COMPILE", "1") != "0" and hasattr(torch, "compile")
        if self.compiled:
            self.encode = torch.compile(_encode, dynamic=True)
            self.decode = torch.compile(_decode, dynamic=True)

    def run(self, name: str, *args):
        if self.compiled:
            try:
                return getattr(self, name)(*args)
            except Exception as error:  # a missing compiler, an unsupported device: eager computes the same
                warnings.warn(f"Mesa: torch.compile failed ({type(error).__name__}); running eager")
                self.compiled, self.encode, self.decode = False, _encode, _decode
        return getattr(self, name)(*args)


_KERNELS: _Kernels | None = None


def _kernels() -> _Kernels:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _Kernels()
    return _KERNELS


def quantize(t: torch.Tensor, group_size: int, stochastic: bool = True,
             generator: torch.Generator | None = None) -> QuantizedTensor:
    flat, layout = memory_order(t.detach())
    padded = -flat.numel() % group_size
    values = flat if flat.dtype == torch.float32 else flat.float()
    if padded:
        values = torch.cat([values, values.new_zeros(padded)])
    groups = values.view(-1, group_size)
    if stochastic:
        noise = _dither(group_size, generator, groups.device)
    else:  # round to nearest: floor(v + 0.5)
        noise = torch.full((1, group_size), 0.5, device=groups.device)
    period = noise.shape[0]
    whole = groups.shape[0] // period * period
    parts = []
    if whole:
        parts.append(_kernels().run("encode", groups[:whole].view(-1, period, group_size), noise))
    if whole < groups.shape[0]:
        rest = groups.shape[0] - whole
        parts.append(_kernels().run("encode", groups[whole:].view(1, rest, group_size), noise[:rest]))
    flat_parts = [(codes.reshape(-1, group_size), low.reshape(-1, 1), scale.reshape(-1, 1))
                  for codes, low, scale in parts]
    codes, low, scale = (pieces[0] if len(pieces) == 1 else torch.cat(pieces) for pieces in zip(*flat_parts))
    return QuantizedTensor(codes, low, scale, t.shape, layout, t.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    values = _kernels().run("decode", q.codes, q.low, q.scale).view(-1)
    return restore_layout(values[: math.prod(q.shape)].to(q.dtype), q.shape, q.layout)


# Eight 0/1 bytes read as one little-endian int64 b0 + b1<<8 + ... : times GATHER, bit 56+k of the product is
# b_k (the partial products are distinct powers of two, so nothing carries), so >> 56 is the packed byte.
# Unpacking replicates a byte into all eight (times SPREAD) and keeps bit k in byte k (SELECT, as signed).
GATHER = 0x0102040810204080
SPREAD = 0x0101010101010101
SELECT = 0x8040201008040201 - 2**64


@dataclass
class PackedMask:
    """A boolean tensor at one bit an element."""

    bits: torch.Tensor  # uint8, ceil(numel / 8)
    shape: torch.Size
    layout: str


def pack_mask(mask: torch.Tensor) -> PackedMask:
    flat, layout = memory_order(mask)
    padded = -flat.numel() % 8
    if padded:
        flat = torch.cat([flat, flat.new_zeros(padded)])
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    bits = ((words * GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)
    return PackedMask(bits, mask.shape, layout)


def unpack_mask(packed: PackedMask) -> torch.Tensor:
    words = (packed.bits.to(torch.int64) * SPREAD).bitwise_and_(SELECT)
    flat = words.view(torch.uint8).view(-1).ne(0)
    return restore_layout(flat[: math.prod(packed.shape)], packed.shape, packed.layout)
