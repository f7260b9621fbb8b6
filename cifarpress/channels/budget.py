"""How many zero-invariant groups to prune, and which ones a score picks, under one target.

A target is either `sparsity` (the fraction of prunable groups to remove) or `macs`
(the fraction of the model's MACs to keep). Either way, every channel space keeps a
width that is a multiple of `channel_multiple` (or its full width): onnxruntime and
TensorRT kernels are tuned for such widths, and an odd width can run slower than the
wider original.

Units and levels
    Groups spanning the same set of channel spaces form a *unit* (a residual stream of
    a ResNet stage is one unit, every inner conv width another). Cutting c groups of a
    unit shrinks all its spaces by c, so the rounding rule becomes a short list of
    allowed pruned counts per unit, its *levels*, and selection adds whole *chunks*
    (the step from one level to the next) instead of single groups.

MACs
    The compact model's MACs are computed exactly from the kept widths (each conv or
    linear costs its profiled MACs times the share of its weight that stays), not as a
    sum of per-group costs: cutting both an input and an output channel of the same conv
    frees one product less than the two per-group costs add up to, so a per-group sum
    would overestimate the saving and could miss the target.
"""
from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from cifarpress.channels.groups import GroupSet
from cifarpress.channels.surgery import round_kept
from cifarpress.errors import CifarpressError
from cifarpress.profile import profile_model

SELECTIONS = ("score", "score-per-mac", "uniform")


@dataclass(frozen=True)
class PruneTarget:
    """Exactly one of `sparsity` (fraction of prunable groups cut) or `macs` (fraction of MACs kept)."""

    sparsity: float | None = None
    macs: float | None = None
    channel_multiple: int = 8
    # macs targets only: "score-per-mac" cuts the lowest score per MAC saved first, spending the budget on
    # channels that cost many MACs (early, high-resolution layers); "score" the lowest-scoring chunks, which
    # empties the cheap, parameter-heavy late layers (ResNet-20 at 50% MACs, 10 epochs: 80.9% vs 84.6%).
    selection: str = "score-per-mac"
    # let a residual branch's inner width go to zero (the block becomes its shortcut plus a constant):
    # a cut that removes a whole block's convs, which runs faster per MAC saved than narrow widths do
    remove_branches: bool = False

    def __post_init__(self):
        given = [name for name in ("sparsity", "macs") if getattr(self, name) is not None]
        if len(given) != 1:
            raise CifarpressError("a prune target needs exactly one of sparsity or macs, each in (0, 1)")
        name = given[0]
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise CifarpressError(f"prune target {name} must lie in (0, 1) (exclusive), got {value!r}")
        if isinstance(self.channel_multiple, bool) or not isinstance(self.channel_multiple, int) \
                or self.channel_multiple < 1:
            raise CifarpressError(f"channel_multiple must be an integer >= 1, got {self.channel_multiple!r}")
        if self.selection not in SELECTIONS:
            raise CifarpressError(f"prune selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")


class PruneBudget:
    """The target made concrete for one model: units, their levels, and an exact MAC count.

    Raises CifarpressError when the model has no prunable group or the target cannot be
    reached even with every unit cut to its narrowest allowed width.
    """

    def __init__(self, model: nn.Module, groupset: GroupSet, target: PruneTarget,
                 example_input: torch.Tensor | None = None):
        if len(groupset) == 0:
            unprunable = "; ".join(f"{name}: {why}" for name, why in groupset.unprunable_spaces.items())
            raise CifarpressError(
                f"{groupset.model_name} has no prunable channel group ({unprunable or 'no channel spaces'}); "
                "structured pruning needs convs or linears between the input and the output")
        self.groupset = groupset
        self.target = target
        self.units, self.levels = _units_and_levels(groupset, target.channel_multiple, target.remove_branches)
        self.unit_of = [0] * len(groupset)
        for u, members in enumerate(self.units):
            for g in members:
                self.unit_of[g] = u
        self.mac_counter = MacCounter(model, groupset, example_input)
        self.capacity = sum(levels[-1] for levels in self.levels)
        n = len(groupset)
        m = target.channel_multiple
        if target.sparsity is not None:
            self.goal_groups = max(1, round(target.sparsity * n))
            if self.goal_groups > self.capacity:
                raise CifarpressError(
                    f"prune target sparsity {target.sparsity:g} needs {self.goal_groups} of {n} groups cut, but "
                    f"keeping widths a multiple of {m} allows at most {self.capacity} "
                    f"({self.capacity / n:.3f}); lower sparsity or channel_multiple")
        else:
            self.goal_macs = math.floor(target.macs * self.mac_counter.full)
            narrowest = self.mac_counter.count(self.most_prunable())
            if narrowest > self.goal_macs:
                raise CifarpressError(
                    f"prune target macs {target.macs:g} is out of reach: cutting every prunable group that "
                    f"channel_multiple {m} allows still keeps {narrowest / self.mac_counter.full:.3f} of the MACs; "
                    "raise macs or lower channel_multiple")

    def most_prunable(self) -> list[int]:
        """Groups cut when every unit is at its narrowest level (lowest ids first)."""
        return sorted(g for members, levels in zip(self.units, self.levels) for g in members[:levels[-1]])

    def reached(self, chosen, progress: float = 1.0) -> bool:
        """Whether cutting `chosen` meets `progress` (0..1] of the way from the full model to the target."""
        chosen = list(chosen)
        if self.target.sparsity is not None:
            return len(chosen) >= math.ceil(progress * self.goal_groups - 1e-9)
        quota = self.mac_counter.full - progress * (self.mac_counter.full - self.goal_macs)
        return self.mac_counter.count(chosen) <= quota

    def select(self, scores: torch.Tensor, pruned, progress: float = 1.0) -> list[int]:
        """`pruned` plus the lowest-scoring chunks, until `progress` of the target is met; sorted ids.

        Chunks are taken greedily by their mean score (per MAC saved, for a MACs target with
        selection score-per-mac or uniform); within a unit the lowest-scoring free groups go
        first. `pruned` is kept whole (frozen groups cannot come back), so it should itself sit
        on levels; a unit off its levels is first completed to its next level.
        """
        score = scores.detach().float().cpu().tolist()
        chosen = set(int(g) for g in pruned)
        if self.target.selection == "uniform":  # the common-fraction cut first, the chunks top it up
            chosen.update(self._uniform_base(score, chosen, progress))
        if self.target.macs is not None and self.target.selection != "score":
            score = [s / max(c, 1e-12) for s, c in zip(score, self.mac_counter.group_cost)]
        tally = self.mac_counter.tally(chosen) if self.target.macs is not None else None
        free = [sorted((g for g in members if g not in chosen), key=lambda g: (score[g], g))
                for members in self.units]
        taken = [len(members) - len(rest) for members, rest in zip(self.units, free)]
        heap: list[tuple[float, int]] = []

        def push(u: int) -> None:
            nxt = next((level for level in self.levels[u] if level > taken[u]), None)
            if nxt is not None:
                chunk = free[u][:nxt - taken[u]]
                heapq.heappush(heap, (sum(score[g] for g in chunk) / len(chunk), u))

        def done() -> bool:
            if tally is None:
                return self.reached(chosen, progress)
            quota = self.mac_counter.full - progress * (self.mac_counter.full - self.goal_macs)
            return tally.macs <= quota

        for u in range(len(self.units)):
            push(u)
        while heap and not done():
            _, u = heapq.heappop(heap)
            nxt = next(level for level in self.levels[u] if level > taken[u])
            chunk, free[u] = free[u][:nxt - taken[u]], free[u][nxt - taken[u]:]
            chosen.update(chunk)
            if tally is not None:
                tally.add(chunk)
            taken[u] = nxt
            push(u)
        return sorted(chosen)

    def _uniform_base(self, score: list[float], pruned: set[int], progress: float) -> list[int]:
        """The largest cut short of `progress` that takes the same fraction of every unit (rounded down
        to a level, never below what is already pruned; the lowest scores inside a unit). Selection
        then tops it up chunk by chunk, so the target is met closely despite coarse levels."""
        order = [sorted(members, key=lambda g: (g not in pruned, score[g], g)) for members in self.units]
        floor = [sum(g in pruned for g in members) for members in self.units]

        def cut(fraction: float) -> list[int]:
            chosen = []
            for u, members in enumerate(self.units):
                level = max(lv for lv in self.levels[u] if lv <= max(floor[u], fraction * len(members) + 1e-9))
                chosen += order[u][:max(level, floor[u])]
            return chosen

        low, high = 0.0, 1.0
        if self.reached(cut(low), progress):
            return cut(low)
        for _ in range(30):  # bisect: the cut grows monotonically with the fraction
            mid = 0.5 * (low + high)
            low, high = (low, mid) if self.reached(cut(mid), progress) else (mid, high)
        return cut(low)

    def gate_chunks(self, scores: torch.Tensor) -> list[list[int]]:
        """The groups of every unit split at its levels, lowest-scoring first: cutting any set of
        whole chunks leaves every width on an allowed multiple (exactly so where a unit's width is
        itself a multiple, as in the zoo's models; otherwise its first chunk is the remainder).
        Groups past a unit's last level can never be cut and belong to no chunk."""
        score = scores.detach().float().cpu().tolist()
        chunks = []
        for members, levels in zip(self.units, self.levels):
            ranked = sorted(members, key=lambda g: (score[g], g))
            chunks += [ranked[a:b] for a, b in zip(levels, levels[1:])]
        return chunks

    def levelled(self, ids) -> list[int]:
        """The largest subset of `ids` that leaves every unit on a level: per unit, the lowest ids
        of the largest allowed count. For zero groups found by a projection (DHSPG), where some
        units stop between levels; the rest stay zero in the compact model, still exact."""
        by_unit: dict[int, list[int]] = defaultdict(list)
        for g in sorted(set(int(g) for g in ids)):
            by_unit[self.unit_of[g]].append(g)
        kept = []
        for u, members in by_unit.items():
            level = max(level for level in self.levels[u] if level <= len(members))
            kept += members[:level]
        return sorted(kept)

    def compact_macs(self, ids) -> int:
        """MACs per image of the model once the groups `ids` are cut."""
        return self.mac_counter.count(ids)


def _units_and_levels(groupset: GroupSet, multiple: int,
                      remove_branches: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    by_spaces: dict[tuple[str, ...], list[int]] = {}
    for g in groupset.groups:
        by_spaces.setdefault(tuple(sorted({space for space, _ in g.channels})), []).append(g.id)
    units_per_space: dict[str, int] = defaultdict(int)
    for spaces in by_spaces:
        for s in spaces:
            units_per_space[s] += 1
    units, levels = [], []
    for spaces, members in by_spaces.items():
        # Channels of the space no group owns stay; the width to round is theirs plus the kept groups.
        # That is well defined only when this unit alone fills the spaces and they agree on it;
        # otherwise the unit's own kept count is rounded (never the case in the zoo models).
        fixed = {groupset.spaces[s].size - groupset.spaces[s].prunable_channels for s in spaces}
        offset = fixed.pop() if len(fixed) == 1 and all(units_per_space[s] == 1 for s in spaces) else 0
        n = len(members)
        first = groupset.groups[members[0]].channels
        if len(first) > len(spaces):
            # several channels per space (a grouped conv's whole group, a chunk's positions): any
            # count of groups; rounding group counts would not round the widths
            kept = set(range(n + 1))
        else:
            kept = {round_kept(offset + c, multiple, offset + n) - offset for c in range(n + 1)}
        units.append(members)
        if remove_branches and offset == 0 and len(spaces) == 1 and spaces[0] in groupset.removable_spaces:
            kept.add(0)  # the residual branch may go whole
        else:
            kept.discard(0)  # otherwise a space keeps at least one multiple
        levels.append(sorted(n - k for k in kept))  # starts at 0: nothing cut
    return units, levels


class MacCounter:
    """Exact MACs per image (profile.py's convention) of the model with some groups cut."""

    def __init__(self, model: nn.Module, groupset: GroupSet, example_input: torch.Tensor | None = None):
        if example_input is None:  # private generator: setting up a pruner must not move the global RNG
            example_input = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            first = next(model.parameters(), None)
            if first is not None:
                example_input = example_input.to(first.device, first.dtype)
        profile = profile_model(model, example_input=example_input[:1])
        self.full = profile.macs
        roles = {(r.param, r.dim): r.group_of for r in groupset.roles}
        params = dict(model.named_parameters())
        # slots: one per (layer, dim) whose width groups can change; a group lists what it removes there
        self.layers: list[tuple[int, tuple[int, ...], list[tuple[int, int]]]] = []  # macs, shape, (dim, slot)
        self.fixed = 0
        self.touches: list[list[tuple[int, int]]] = [[] for _ in range(len(groupset))]  # group -> (slot, count)
        n_slots = 0
        for layer in profile.layers:
            weight = params.get(f"{layer.name}.weight")
            dims = [d for d in (0, 1) if weight is not None and (f"{layer.name}.weight", d) in roles]
            if not layer.macs or not dims:
                self.fixed += layer.macs  # a layer no group narrows costs the same after the cut
                continue
            slots = []
            for d in dims:
                group_of = roles[(f"{layer.name}.weight", d)]
                counts = torch.bincount(group_of[group_of >= 0], minlength=len(groupset)).tolist()
                for g, c in enumerate(counts):
                    if c:
                        self.touches[g].append((n_slots, c))
                slots.append((d, n_slots))
                n_slots += 1
            self.layers.append((layer.macs, tuple(weight.shape), slots))
        self.n_slots = n_slots
        # MACs each group costs in the full model (its share of every layer it narrows)
        slot_cost = {slot: macs / shape[d] for macs, shape, slots in self.layers for d, slot in slots}
        self.group_cost = [sum(slot_cost[slot] * c for slot, c in touches) for touches in self.touches]

    def tally(self, ids=()) -> "MacTally":
        t = MacTally(self)
        t.add(ids)
        return t

    def count(self, ids) -> int:
        return self.tally(ids).macs


class MacTally:
    """Running MAC count while groups are added one chunk at a time (selection checks it after each)."""

    def __init__(self, counter: MacCounter):
        self.counter = counter
        self.lost = [0] * counter.n_slots
        self.macs = counter.full

    def add(self, ids) -> None:
        for g in ids:
            for slot, c in self.counter.touches[g]:
                self.lost[slot] += c
        self.macs = self.counter.fixed + sum(self._layer(*layer) for layer in self.counter.layers)

    def _layer(self, macs: int, shape: tuple[int, ...], slots) -> int:
        kept = list(shape)
        for d, slot in slots:
            kept[d] -= self.lost[slot]
        # conv/linear MACs at a fixed output size scale with the kept share of the weight
        return macs * math.prod(kept) // math.prod(shape)
