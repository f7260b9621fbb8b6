"""Zero-invariant groups (ZIGs): which channels can be cut together, found on a torch.fx trace.

This module holds the group structures (ZIG, ParamSlice, SpaceInfo, ParamRole, GroupSet) and
discover_groups, which runs the channel-flow tracer in channel_flow (fx tracing, shape
propagation, following channels through the graph) and turns what it found into groups.

Channel spaces
    A *channel space* is the set of channels one layer creates: the output channels
    of a conv with groups=1, the output features of a linear, the network input, or
    a tensor the tracer could not follow ("opaque"). Depthwise convs, BatchNorm,
    activations with f(0)=0, pooling and flatten carry channels through unchanged;
    torch.cat along dim 1 lays spaces side by side; a residual add (or an elementwise
    mul) couples channel k of its operands, so their spaces become one coupled space.

Groups
    A ZIG is one channel joined with every channel coupled to it (channel i of a
    residual stage across all the convs that add into it), with three kinds of
    parameter slices:

    producers  the trainable slices that compute the channel: out-rows of conv and
               linear weights and biases, depthwise rows, and the weight and bias of
               *every* BatchNorm applied to the channel. When all of them are zero the
               channel is exactly 0 wherever it appears, in train and eval mode: a
               conv/linear row gives 0, BN gives 0 * x_hat + 0 = 0 whatever its
               statistics, the followed activations map 0 to 0, and adds, cats and
               pools of zeros are zeros. Zeroing the conv alone is not enough:
               BN(0) = bias - mean * weight / std.
    buffers    BN running statistics: cut by surgery, never zeroed nor counted in norms.
    consumers  in-columns of the convs and linears that read the channel; an exactly
               zero channel contributes nothing through them, so cutting them is exact.

    Pre-activation blocks (WRN) are where the "every BatchNorm" rule matters: that BN
    sits on the residual sum, after the add and before the next conv, so its
    per-channel weight and bias are producers of the summed space's groups next to
    the convs feeding the sum; otherwise BN(0) = bias would flow into the next conv.

Never a wrong cut
    A space touched by anything the tracer cannot follow (a custom op, torch.split,
    indexing, a reshape that mixes channels, a grouped conv, BN without affine
    parameters, a module with hooks or shared parameters, ...) is unprunable, and so
    is every channel coupled to it; a warning names the op. The network input and
    output spaces are never prunable.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from cifarpress.channels.flow import _ChannelFlow, eval_mode, follow_channels  # noqa: F401  (eval_mode: for surgery, pruner)
from cifarpress.errors import CifarpressError


class UnsupportedOpWarning(UserWarning):
    """An op the group tracer cannot follow; the channel spaces it touches stay unprunable."""


@dataclass(frozen=True)
class ParamSlice:
    param: str                # qualified name in the model, e.g. "layer1.0.conv1.weight"
    dim: int                  # 0: out-rows / per-channel vectors, 1: in-columns
    indices: tuple[int, ...]  # positions along `dim`


@dataclass(frozen=True)
class ZIG:
    id: int
    channels: tuple[tuple[str, int], ...]  # (channel space, index in it), all cut together
    producers: tuple[ParamSlice, ...]      # all zero <=> the channels are exactly zero
    buffers: tuple[ParamSlice, ...]        # BN running stats: cut, never zeroed
    consumers: tuple[ParamSlice, ...]      # in-columns of the layers reading the channels

    @property
    def space(self) -> str:
        return self.channels[0][0]


@dataclass(frozen=True)
class SpaceInfo:
    name: str
    size: int
    prunable_channels: int
    reason: str | None  # why some or all channels are not prunable; None when all are


@dataclass(frozen=True)
class ParamRole:
    """Vectorised view of the groups: which group owns each row (or column) of one parameter."""

    param: str
    dim: int
    kind: str                 # "producer" | "buffer" | "consumer"
    group_of: torch.Tensor    # long, size of `param` along `dim`; -1 where no prunable group owns it


class GroupSet:
    """The zero-invariant groups of one model, with helpers to measure and zero them."""

    def __init__(self, model_name: str, groups: list[ZIG], spaces: dict[str, SpaceInfo],
                 coupled_spaces: list[tuple[str, ...]], roles: list[ParamRole], unsupported_ops: list[str]):
        self.model_name = model_name
        self.groups = groups
        self.spaces = spaces
        self.coupled_spaces = coupled_spaces
        self.roles = roles
        self.unsupported_ops = unsupported_ops
        # spaces that may be cut whole (every channel): set by discover_groups, see _removable_branches
        self.removable_spaces: frozenset[str] = frozenset()
        self._by_channel = {ch: g.id for g in groups for ch in g.channels}
        self._owned: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def prunable_spaces(self) -> list[str]:
        """Spaces with at least one prunable channel."""
        return [s.name for s in self.spaces.values() if s.prunable_channels]

    @property
    def unprunable_spaces(self) -> dict[str, str]:
        """Spaces with at least one channel that must stay, and why."""
        return {s.name: s.reason for s in self.spaces.values() if s.reason}

    def removable_group_ids(self) -> set[int]:
        """Ids of the groups that lie in removable spaces only."""
        return {g.id for g in self.groups if all(space in self.removable_spaces for space, _ in g.channels)}

    def group_of(self, space: str, index: int) -> int | None:
        """Id of the group holding channel `index` of `space`, or None if it is not prunable."""
        return self._by_channel.get((space, index))

    def _producer_rows(self, model: nn.Module):
        """(rows of a producer parameter that lie in groups, as a 2-D tensor; their group ids)."""
        for i, role in enumerate(self.roles):
            if role.kind == "producer":
                p = model.get_parameter(role.param).detach()
                key = (i, p.device)
                if key not in self._owned:  # cached per device: an optimizer asks every step
                    inside = (role.group_of >= 0).nonzero().flatten()
                    self._owned[key] = (inside.to(p.device), role.group_of[inside].to(p.device))
                rows, owner = self._owned[key]
                yield p.movedim(role.dim, 0).reshape(p.shape[role.dim], -1)[rows], owner

    @torch.no_grad()
    def group_norms(self, model: nn.Module) -> torch.Tensor:
        """L2 norm of each group over all its producer slices, shape (len(groups),), float32."""
        device = next(model.parameters()).device
        sq = torch.zeros(len(self.groups), device=device)
        for rows, owner in self._producer_rows(model):
            sq.index_add_(0, owner, rows.float().pow(2).sum(1))
        return sq.sqrt()

    @torch.no_grad()
    def group_max_abs(self, model: nn.Module) -> torch.Tensor:
        """Largest |value| over each group's producer slices; 0 means exactly zero."""
        device = next(model.parameters()).device
        top = torch.zeros(len(self.groups), device=device)
        for rows, owner in self._producer_rows(model):
            top.scatter_reduce_(0, owner, rows.float().abs().amax(1), reduce="amax")
        return top

    def zero_group_ids(self, model: nn.Module, threshold: float = 0.0) -> list[int]:
        """Ids of the groups whose producer slices are all within `threshold` of zero."""
        return (self.group_max_abs(model) <= threshold).nonzero().flatten().tolist()

    @torch.no_grad()
    def zero_groups(self, model: nn.Module, group_ids, consumers: bool = True) -> None:
        """Set every producer slice of these groups to exactly zero (their channels then output 0), and the
        consumer slices that read them: they only ever multiply those zeros, and zeroed, a statistic over the
        consumer's weight (a ternary scale skips zeros) is the same before and after the cut."""
        ids = self._checked_ids(group_ids)
        kinds = ("producer", "consumer") if consumers else ("producer",)
        for role in self.roles:
            if role.kind in kinds:
                p = model.get_parameter(role.param)
                rows = torch.isin(role.group_of, ids).nonzero().flatten()
                p.index_fill_(role.dim, rows.to(p.device), 0.0)

    def _checked_ids(self, group_ids) -> torch.Tensor:
        ids = torch.as_tensor(sorted(set(int(g) for g in group_ids)), dtype=torch.long)
        if len(ids) and (ids[0] < 0 or ids[-1] >= len(self.groups)):
            raise CifarpressError(f"group ids must lie in 0..{len(self.groups) - 1} for {self.model_name}")
        return ids

    def summary(self) -> str:
        """A few lines: counts, coupled spaces, and why the unprunable ones are."""
        lines = [f"{self.model_name}: {len(self.groups)} zero-invariant groups over {len(self.spaces)} channel "
                 f"spaces ({len(self.prunable_spaces)} prunable, {len(self.coupled_spaces)} coupled sets)"]
        lines += [f"  coupled: {' + '.join(names)}" for names in self.coupled_spaces]
        lines += [f"  unprunable: {name} ({why})" for name, why in self.unprunable_spaces.items()]
        return "\n".join(lines)


def discover_groups(model: nn.Module, example_input: torch.Tensor | None = None) -> GroupSet:
    """Trace `model` with torch.fx and return its zero-invariant groups.

    `example_input` (default: one random 3x32x32 image on the model's device) feeds the
    shape propagation that tells a 1x1 global pool from a larger map before a flatten.
    Ops the tracer cannot follow are reported with an UnsupportedOpWarning and leave
    the spaces they touch unprunable; a model fx cannot trace raises CifarpressError.
    """
    flow = follow_channels(model, example_input)
    for message in flow.unsupported:
        warnings.warn(message, UnsupportedOpWarning, stacklevel=2)
    groupset = _build(flow, type(model).__name__)
    groupset.removable_spaces = _removable_branches(model, groupset)
    return groupset


def _removable_branches(model: nn.Module, groupset: GroupSet) -> frozenset[str]:
    """Spaces that can lose every channel: the inner width of a residual branch.

    Cutting a whole space is exact when its producers are plain convs/linears and BatchNorms
    that make nothing else, and its consumers plain convs/linears that read nothing else: the
    consumers then output their bias, a constant (cifarpress.models.layers). It is only *sensible*
    when each consumer's output is summed with another path (a coupled space), so the
    branch turns into shortcut + constant; on a plain chain (VGG) the network would go
    constant, so those spaces stay non-removable.
    """
    coupled = {name for names in groupset.coupled_spaces for name in names}
    modules = dict(model.named_modules())
    in_space: dict[str, set[int]] = defaultdict(set)
    for g in groupset.groups:
        spaces = {space for space, _ in g.channels}
        if len(spaces) == 1:
            in_space[spaces.pop()].add(g.id)
    owners_of = [set(role.group_of.tolist()) for role in groupset.roles]  # once, not once per space
    removable = set()
    for name, ids in in_space.items():
        info = groupset.spaces[name]
        if name in coupled or info.reason or info.prunable_channels != info.size:
            continue
        consumers, ok = 0, True
        for role, owners in zip(groupset.roles, owners_of):
            if not owners & ids:
                continue
            module_name = role.param.rpartition(".")[0]
            module = modules[module_name]
            # exact types: a subclass's forward may need the input width it is left without
            plain = type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)
            if not owners <= ids:  # the module also makes or reads other channels
                ok = False
            elif role.kind == "producer":
                ok = plain or type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
            elif role.kind == "consumer":
                ok = plain and module_name in coupled
                consumers += 1
            if not ok:
                break
        if ok and consumers:
            removable.add(name)
    return frozenset(removable)


def _build(flow: _ChannelFlow, model_name: str) -> GroupSet:
    """The GroupSet of what the tracer found: one group per coupled component that some parameter
    produces and no forbidden space touches."""
    n = len(flow.parent)
    roots = [flow.find(c) for c in range(n)]
    blocked: dict[int, str] = {}  # root -> the forbidden space that blocks its whole component
    for space in flow.spaces:
        if space.reason:
            for c in space.ids:
                blocked.setdefault(roots[c], space.name)
    produced = {roots[c] for kind, ids in flow.roles.values() if kind == "producer" for c in ids}
    group_of_root: dict[int, int] = {}
    for c in range(n):  # ascending ids: groups come in graph order
        r = roots[c]
        if r not in blocked and r in produced and r not in group_of_root:
            group_of_root[r] = len(group_of_root)
    group_of = [group_of_root.get(r, -1) for r in roots]

    roles = [ParamRole(param, dim, kind, torch.tensor([group_of[c] for c in ids], dtype=torch.long))
             for (param, dim), (kind, ids) in flow.roles.items()]
    groups = _groups(flow, len(group_of_root), group_of, roles)
    spaces = _space_infos(flow, roots, group_of, blocked)
    return GroupSet(model_name, groups, spaces, _coupled_spaces(flow, roots), roles, flow.unsupported)


def _groups(flow: _ChannelFlow, count: int, group_of: list[int], roles: list[ParamRole]) -> list[ZIG]:
    members: list[list[int]] = [[] for _ in range(count)]
    for c, g in enumerate(group_of):
        if g >= 0:
            members[g].append(c)
    positions: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(count)]
    for r, role in enumerate(roles):
        for pos, g in enumerate(role.group_of.tolist()):
            if g >= 0:
                positions[g][r].append(pos)
    groups = []
    for g in range(count):
        by_kind: dict[str, list[ParamSlice]] = {"producer": [], "buffer": [], "consumer": []}
        for r, pos in positions[g].items():
            by_kind[roles[r].kind].append(ParamSlice(roles[r].param, roles[r].dim, tuple(pos)))
        groups.append(ZIG(g, tuple(flow.channel(c) for c in members[g]), tuple(by_kind["producer"]),
                          tuple(by_kind["buffer"]), tuple(by_kind["consumer"])))
    return groups


def _space_infos(flow: _ChannelFlow, roots: list[int], group_of: list[int],
                 blocked: dict[int, str]) -> dict[str, SpaceInfo]:
    by_name = {s.name: s for s in flow.spaces}
    infos = {}
    for space in flow.spaces:
        kept = [c for c in space.ids if group_of[c] < 0]
        reason = space.reason
        if reason is None and kept:
            blocker = next((blocked[roots[c]] for c in kept if roots[c] in blocked), None)
            reason = (f"coupled to '{blocker}' ({by_name[blocker].reason})" if blocker
                      else "no parameter produces it")
        infos[space.name] = SpaceInfo(space.name, space.size, space.size - len(kept), reason)
    return infos


def _coupled_spaces(flow: _ChannelFlow, roots: list[int]) -> list[tuple[str, ...]]:
    linked: dict[int, set[int]] = defaultdict(set)  # root channel -> spaces its component spans
    for c, r in enumerate(roots):
        linked[r].add(flow.space_of[c])
    parent = list(range(len(flow.spaces)))

    def find(s: int) -> int:
        while parent[s] != s:
            s = parent[s]
        return s

    for spaces in linked.values():
        first, *rest = sorted(spaces)
        for s in rest:
            a, b = find(first), find(s)
            if a != b:
                parent[max(a, b)] = min(a, b)
    sets: dict[int, list[str]] = defaultdict(list)
    for s, space in enumerate(flow.spaces):
        sets[find(s)].append(space.name)
    return [tuple(names) for names in sets.values() if len(names) > 1]
