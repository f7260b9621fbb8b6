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
instead of adding up as round-to-nearest's bias would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def quantize(t: torch.Tensor, group_size: int, stochastic: bool = True,
             generator: torch.Generator | None = None) -> QuantizedTensor:
    flat, layout = memory_order(t.detach())
    n = flat.numel()
    padded = -n % group_size
    values = flat.float()
    if padded:
        values = torch.cat([values, values.new_zeros(padded)])
    groups = values.view(-1, group_size)
    low = groups.amin(1, keepdim=True).half()
    high = groups.amax(1, keepdim=True)
    # A constant group has no range: any positive scale stores it exactly (every code 0).
    scale = ((high - low.float()) / LEVELS).clamp_min(1e-7).half()
    scaled = (groups - low.float()) / scale.float()
    if stochastic:
        scaled = scaled.add_(torch.rand(scaled.shape, generator=generator, device=scaled.device)).floor_()
    else:
        scaled = scaled.round_()
    codes = scaled.clamp_(0, LEVELS).to(torch.uint8)
    return QuantizedTensor(codes, low, scale, t.shape, layout, t.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    values = (q.codes.float() * q.scale.float() + q.low.float()).view(-1)
    numel = 1
    for size in q.shape:
        numel *= size
    return restore_layout(values[:numel].to(q.dtype), q.shape, q.layout)


_BIT_WEIGHTS = {}


def _bit_weights(device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = (2 ** torch.arange(8, device=device)).to(torch.uint8)
    return _BIT_WEIGHTS[device]


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
    bits = (flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)
    return PackedMask(bits, mask.shape, layout)


def unpack_mask(packed: PackedMask) -> torch.Tensor:
    flat = (packed.bits.unsqueeze(1) & _bit_weights(packed.bits.device)).ne(0).view(-1)
    numel = 1
    for size in packed.shape:
        numel *= size
    return restore_layout(flat[:numel], packed.shape, packed.layout)
