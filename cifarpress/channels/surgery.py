"""Physical channel surgery: turn zeroed groups into a smaller model that computes the same function.

`compact_model` deep-copies the model and, in every module that owns a cut row or column
(a conv, BatchNorm or linear, or a subclass of one, or any module whose forward calls
F.conv2d / F.linear / F.batch_norm on its own parameters), keeps only the kept slices and
updates the width settings (depthwise convs shrink in, out and groups together; grouped
convs lose whole groups). The forward code, every other module and the training flags are
the copy's own, so the result is still the user's model class.

A space cut whole, which GroupSet allows only for a residual branch's inner width, leaves its
producer without outputs and its consumer without inputs: they become the stand-ins of
cifarpress.models.layers (an empty tensor, then the consumer's bias as a constant) and its
BatchNorm an Identity, so the block computes shortcut + constant, as the zeroed model does.

Cutting a group is exact only when its producer slices are all zero (see groups.py);
`verify_compact` measures that, and `compact_model(check_input=...)` refuses a cut that is not.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from cifarpress.channels.groups import GroupSet, eval_mode
from cifarpress.errors import CifarpressError
from cifarpress.models.layers import ChannelsCut, ConstantChannels

Keep = dict[tuple[str, int], torch.Tensor]  # (attribute, dim) -> kept positions, only where some are cut


def round_kept(count: int, multiple: int, total: int | None = None) -> int:
    """Channels to keep in a space whose width must be a multiple of `multiple` (tensor-core / SIMD
    friendly): `count` rounded up, at least one multiple, never more than the `total` it has."""
    if multiple < 1:
        raise ValueError(f"channel multiple must be >= 1, got {multiple}")
    kept = max(multiple, math.ceil(count / multiple) * multiple)
    return kept if total is None else min(kept, total)


def compact_model(model: nn.Module, groupset: GroupSet, zero_threshold: float = 0.0, *,
                  group_ids=None, check_input: torch.Tensor | None = None, atol: float = 1e-4) -> nn.Module:
    """A physically smaller copy of `model` without the channels of the cut groups.

    Cuts `group_ids` when given, otherwise every group whose producer slices are all within
    `zero_threshold` of zero (0.0: exactly zero, so the copy computes the same function).
    With `check_input`, the copy is run against `model` and a difference above `atol`
    raises CifarpressError. `model` itself is left untouched.
    """
    if group_ids is None:
        cut = torch.tensor(groupset.zero_group_ids(model, zero_threshold), dtype=torch.long)
    else:
        cut = groupset._checked_ids(group_ids)
    compact = copy.deepcopy(model)
    for module_name, keep in _kept_positions(groupset, cut).items():
        old = compact.get_submodule(module_name)
        new = _rebuilt(old, keep)
        if new is not old:
            _swap(compact, old, new)
    if check_input is not None:
        diff = verify_compact(model, compact, check_input)
        if not diff <= atol:
            raise CifarpressError(
                f"the compacted {type(model).__name__} differs from the original by {diff:.3g} (> {atol:g}) on the "
                "check input, so the cut groups were not all zero; zero them first with GroupSet.zero_groups"
            )
    return compact


def verify_compact(zeroed_model: nn.Module, compact: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between the two models' outputs on `x`, both in eval mode."""
    with eval_mode(zeroed_model, compact):
        expected, got = _tensors(zeroed_model(x)), _tensors(compact(x))
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        raise CifarpressError("the compacted model returns outputs of other shapes than the original")
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(expected, got))


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for item in output for t in _tensors(item)]


def _kept_positions(groupset: GroupSet, cut: torch.Tensor) -> dict[str, Keep]:
    """Per module, the rows/columns that stay, for every parameter and buffer that loses some."""
    plan: dict[str, Keep] = {}
    removable = groupset.removable_group_ids()
    for role in groupset.roles:
        lost = torch.isin(role.group_of, cut)
        if not lost.any():
            continue
        module_name, _, attr = role.param.rpartition(".")
        kept = (~lost).nonzero().flatten()
        if role.kind == "producer" and len(kept) == 0 and not set(role.group_of.tolist()) <= removable:
            raise CifarpressError(
                f"cutting these groups would leave '{module_name}' with no channels; keep at least one group of "
                "every channel space"
            )
        plan.setdefault(module_name, {})[(attr, role.dim)] = kept
    return plan


def _rebuilt(old: nn.Module, keep: Keep) -> nn.Module:
    """The module at the kept width: the same object with its slices kept and its width settings
    updated, so a subclass (timm's BatchNormAct2d, a conv with its own padding) keeps its class,
    its forward and everything else it holds; or a stand-in where a whole space is cut."""

    def width(dim: int, full: int) -> int:
        kept = keep.get(("weight", dim))
        return full if kept is None else len(kept)

    # A residual branch cut whole (GroupSet.removable_spaces): torch has no zero-width layer, so stand-ins
    if isinstance(old, (nn.Conv2d, nn.Linear)) and getattr(old, "groups", 1) == 1:  # weight: (out, in, ...)
        if width(0, old.weight.shape[0]) == 0:
            return ChannelsCut.replacing(old)
        if width(1, old.weight.shape[1]) == 0:
            bias = None if old.bias is None else _sliced(old.bias, "bias", keep)
            return ConstantChannels.replacing(old, width(0, old.weight.shape[0]), bias).train(old.training)
    if isinstance(old, nn.modules.batchnorm._BatchNorm) and width(0, old.num_features) == 0:
        return nn.Identity()
    for attr, value in old._parameters.items():
        if value is not None and any(name == attr for name, _ in keep):
            old._parameters[attr] = nn.Parameter(_sliced(value, attr, keep), requires_grad=value.requires_grad)
    for attr, value in old._buffers.items():
        if value is not None and any(name == attr for name, _ in keep):
            old._buffers[attr] = _sliced(value, attr, keep)
    if isinstance(old, nn.modules.conv._ConvNd):
        old.groups = _kept_groups(old, keep.get(("weight", 0)))
        old.in_channels, old.out_channels = old.groups * old.weight.shape[1], old.weight.shape[0]
    elif isinstance(old, nn.Linear):
        old.out_features, old.in_features = old.weight.shape
    elif isinstance(old, nn.modules.batchnorm._NormBase):
        old.num_features = (old.weight if old.weight is not None else old.running_mean).shape[0]
    return old  # any other holder of cut parameters (a module calling F.conv2d on its own) needs no settings


def _kept_groups(conv: nn.modules.conv._ConvNd, kept_rows: torch.Tensor | None) -> int:
    """`groups` after the cut. The tracer cuts a grouped conv either by whole groups (the kept rows
    fill whole groups; a depthwise conv is one channel per group) or by equal counts per group (every
    group keeps rows, `groups` stays)."""
    if conv.groups == 1 or kept_rows is None:
        return conv.groups
    per_group = conv.out_channels // conv.groups
    blocks = torch.bincount(kept_rows.cpu() // per_group, minlength=conv.groups)
    whole = blocks[blocks > 0]
    return int(len(whole)) if bool((whole == per_group).all()) and len(whole) < conv.groups else conv.groups


def _sliced(value: torch.Tensor, attr: str, keep: Keep) -> torch.Tensor:
    out = value.detach()
    for (name, dim), kept in keep.items():
        if name == attr:
            out = out.index_select(dim, kept.to(out.device))
    channels_last = value.dim() == 4 and not value.is_contiguous() \
        and value.is_contiguous(memory_format=torch.channels_last)
    # clone: the copy owns its storage instead of viewing the original's
    return out.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _swap(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is registered (a module can sit under several names)."""
    names = [name for name, m in root.named_modules(remove_duplicate=False) if m is old]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, new)
