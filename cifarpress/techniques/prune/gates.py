"""Learned gates on zero-invariant groups: the layer that consensus gating (gating.py) trains.

A gate multiplies its groups' channels right after every BatchNorm that produces them (after the
conv or linear itself where a group has no BatchNorm). Since a group's channels are exactly zero
wherever its producers are, a closed gate (0) is the same network as the cut one, and an open gate
(1) changes nothing, so the gates fold away: the cut zeroes the closed groups' producers and the
gates are removed, with no gate op left for export.

One gate serves a whole *chunk* of groups (`chunks`, by default one group each): the pruner gives
it the step between two allowed widths of a unit (PruneBudget.gate_chunks), so any mix of closed
gates is a width the cut can keep, and the MACs the gates count are the MACs the cut keeps. With a
gate per group, ResNet-20's gates met 0.50 of the MACs while the mask rounded to multiples of 8
kept 0.70, and the freeze then cut the difference at once. Groups in no chunk keep a gate of 1.

A residual branch whose inner width may go whole (GroupSet.removable_spaces) also gets a branch
gate that multiplies all of its groups' gates: y = x + g * F(x) for a closed branch, cut exactly
by the surgery's branch removal.

Gate values (GateBank.group_gates):
    hard      forward 1[p > 0.5] with p = sigmoid(logit), backward through p (straight-through);
    annealed  ChipNet's continuous Heaviside h(p) = 1 - exp(-gamma p) + p exp(-gamma), gamma raised
              over the gating window so the gates end crisp (Tiwari et al., ICLR 2021);
    dynamic   `consensus` mode: a head (global average pool, two 1x1 convs) on a gated BatchNorm's
              output adds a per-sample term to the logits of groups that BatchNorm alone produces;
              the gating loss then pushes every input to agree (gating.py).
Once the plug-in freezes the mask (`frozen`), every gate is its constant 0 or 1.

The bank is a submodule of the model (`cifarpress_gates`), so checkpoints, resume, DDP and an EMA
copy carry it; the hooks are small objects, so a deepcopy binds them to the copy's own bank.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cifarpress.channels.groups import GroupSet

BANK_NAME = "cifarpress_gates"
GATE_FORMS = ("hard", "annealed")


def _key(module_name: str) -> str:
    return module_name.replace(".", "__") or "root"


class GateBank(nn.Module):
    def __init__(self, n_groups: int, branch_of: torch.Tensor, form: str = "hard", init_logit: float = 3.0,
                 chunk_of: torch.Tensor | None = None):
        super().__init__()
        if form not in GATE_FORMS:
            raise ValueError(f"gate form must be one of {', '.join(GATE_FORMS)}, got {form!r}")
        self.form = form
        n_branches = int(branch_of.max().item()) + 1 if len(branch_of) else 0
        chunk_of = torch.arange(n_groups) if chunk_of is None else chunk_of
        n_chunks = int(chunk_of.max().item()) + 1 if len(chunk_of) else 0
        self.logits = nn.Parameter(torch.full((n_chunks,), float(init_logit)))  # one per chunk
        self.register_buffer("chunk_of", chunk_of.clone().long())  # -1: a group no gate closes
        self.branch_logits = nn.Parameter(torch.full((n_branches,), float(init_logit)))
        # integer and bool buffers: an EMA copies them instead of averaging them
        self.register_buffer("branch_of", branch_of.clone().long())
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("keep", torch.ones(n_groups, dtype=torch.bool))
        # running batch mean of the dynamic gates' probabilities: the agreed mask the freeze reads
        self.register_buffer("agreed", torch.ones(n_groups))
        self.heads = nn.ModuleDict()
        # head key -> (the group ids it predicts, sorted; the channel positions they hold in the hooked output;
        # which of those groups each position belongs to; which head output, one per chunk, each group takes),
        # fixed when the head is added
        self.head_slots: dict[str, tuple[torch.Tensor, ...]] = {}
        self.sharpness = 1.0  # annealed form's gamma; set by the plug-in every step
        # (data_ptr of `frozen`, its value) as the plug-in noted it: reading a CUDA buffer is a host sync, and every
        # hooked module asks on every forward. Keyed on the storage, so a copy or a move (an EMA's deepcopy) reads
        # its own buffer instead.
        self._frozen_note: tuple[int, bool] | None = None
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # (group ids, per-sample p) of this forward

    def add_head(self, key: str, index: torch.Tensor, group_ids: torch.Tensor) -> None:
        """A per-sample head for `group_ids` (sorted) of the module whose channels `index` maps to groups.

        It predicts one term per chunk, not per group: a chunk's groups open and close together, per sample
        as in the static gates, so the agreed mask the freeze cuts by is the one the samples were trained on."""
        channels = len(index)
        hidden = max(4, channels // 4)
        chunks, chunk_pos = torch.unique(self.chunk_of[group_ids], return_inverse=True)
        head = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, len(chunks), 1))
        nn.init.zeros_(head[2].weight)  # starts as the static gate: the head learns only a per-sample correction
        nn.init.zeros_(head[2].bias)
        self.heads[key] = head
        positions = torch.isin(index, group_ids).nonzero().flatten()
        self.head_slots[key] = (group_ids.clone(), positions, torch.searchsorted(group_ids, index[positions]),
                                chunk_pos)

    def note_frozen(self, value: bool | None = None) -> None:
        """Remember `frozen`'s value (read once when not given); whoever writes the buffer in place must note again."""
        self._frozen_note = (self.frozen.data_ptr(), bool(self.frozen) if value is None else bool(value))

    def has_frozen_note(self) -> bool:
        return self._frozen_note is not None and self._frozen_note[0] == self.frozen.data_ptr()

    def is_frozen(self) -> bool:
        return self._frozen_note[1] if self.has_frozen_note() else bool(self.frozen)

    # -- probabilities --------------------------------------------------------------------------
    def branch_probs(self) -> torch.Tensor:
        """Each group's branch gate probability (1 for groups outside removable branches)."""
        padded = torch.cat([torch.sigmoid(self.branch_logits), self.branch_logits.new_ones(1)])
        return padded[self.branch_of]  # -1 picks the padding

    def group_logits(self) -> torch.Tensor:
        """Each group's gate logit: its chunk's (+inf for a group in no chunk)."""
        return torch.cat([self.logits, self.logits.new_full((1,), math.inf)])[self.chunk_of]

    def probs(self) -> torch.Tensor:
        """p_chunk * p_branch, the static probability that each group stays."""
        return torch.sigmoid(self.group_logits()) * self.branch_probs()

    def agreed_probs(self) -> torch.Tensor:
        """probs() with each dynamic group's running batch mean in its place: what the freeze cuts by."""
        p = self.probs().detach().clone()
        for ids, *_ in self.head_slots.values():
            ids = ids.to(p.device)
            p[ids] = self.agreed[ids]
        return p

    def _value(self, p: torch.Tensor) -> torch.Tensor:
        if self.form == "annealed" and self.training:
            g = self.sharpness
            return 1 - torch.exp(-g * p) + p * math.exp(-g)
        hard = (p > 0.5).to(p.dtype)
        return hard + (p - p.detach()) if self.training else hard  # straight-through, exactly 0 or 1 forward

    def _anchor(self) -> torch.Tensor:
        """0, but depending on every gate parameter: after the freeze they no longer shape the output,
        and DDP refuses parameters that take no part in the loss."""
        return sum(p.sum() for p in self.parameters()) * 0.0

    def group_gates(self) -> torch.Tensor:
        if self.is_frozen():
            return self.keep.to(self.logits.dtype) + self._anchor()
        return self._value(self.probs())

    def channel_gates(self, index: torch.Tensor, key: str | None, output: torch.Tensor) -> torch.Tensor:
        """The multiplier of a hooked module's output channels: (C,), or (B, C) with a dynamic head."""
        gates = torch.cat([self.group_gates(), self.logits.new_ones(1)])
        vec = gates[index]
        if key is None or key not in self.heads or self.is_frozen():
            return vec
        slots = self.head_slots[key]
        if slots[0].device != output.device:  # moved once, not copied (a host sync) on every forward
            slots = self.head_slots[key] = tuple(t.to(output.device) for t in slots)
        ids, positions, order, chunk_pos = slots
        pooled = output.float().mean(dim=(2, 3), keepdim=True)  # heads sit on BatchNorm2d outputs only
        extra = self.heads[key](pooled).flatten(1)[:, chunk_pos]  # (B, groups of this module), equal per chunk
        p = torch.sigmoid(self.group_logits()[ids] + extra) * self.branch_probs()[ids]
        if self.training:
            self.samples.append((ids, p))
        per_sample = vec.unsqueeze(0).expand(output.shape[0], -1).clone()
        per_sample[:, positions] = self._value(p)[:, order]
        return per_sample


class GateHook:
    """Forward hook of one gated module: multiplies its output channels by their groups' gates."""

    def __init__(self, bank: GateBank, index: torch.Tensor, key: str | None):
        self.bank, self.index, self.key = bank, index, key

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self.index.device != output.device:
            self.index = self.index.to(output.device)
        vec = self.bank.channel_gates(self.index, self.key, output)
        if vec.dim() == 1:  # the same gates for every sample
            vec = vec.unsqueeze(0)
        return output * vec.view(*vec.shape, *(1,) * (output.dim() - 2)).to(output.dtype)


def gated_modules(model: nn.Module, groupset: GroupSet) -> dict[str, torch.Tensor]:
    """Per module to hook, the group of each output channel (len(groupset) where none is gated there).

    A group is gated after each BatchNorm among its producers, or after its conv/linear producers
    when it has no BatchNorm (a BN normalizes a gate applied before it away)."""
    n = len(groupset)
    modules = dict(model.named_modules())
    has_bn = torch.zeros(n + 1, dtype=torch.bool)
    producer_roles = [r for r in groupset.roles if r.kind == "producer" and r.param.endswith(".weight") and r.dim == 0]
    for role in producer_roles:
        if isinstance(modules[role.param.rpartition(".")[0]], nn.modules.batchnorm._BatchNorm):
            ids = role.group_of[role.group_of >= 0]
            has_bn[ids] = True
    hooked: dict[str, torch.Tensor] = {}
    for role in producer_roles:
        name = role.param.rpartition(".")[0]
        is_bn = isinstance(modules[name], nn.modules.batchnorm._BatchNorm)
        group_of = role.group_of.clone()
        owned = group_of >= 0
        gated = owned & (has_bn[group_of.clamp(min=0)] == is_bn)
        index = torch.where(gated, group_of, torch.full_like(group_of, n))
        if gated.any():
            hooked[name] = index
    return hooked


def attach_gates(model: nn.Module, groupset: GroupSet, *, form: str = "hard", dynamic: bool = False,
                 branches: bool = False, init_logit: float = 3.0,
                 chunks: list[list[int]] | None = None) -> GateBank:
    """Put a GateBank on `model` and hook every gated module; returns the bank.

    `chunks` lists the groups each gate serves (default: one gate per group)."""
    n = len(groupset)
    chunk_of = None
    if chunks is not None:
        chunk_of = torch.full((n,), -1, dtype=torch.long)
        for c, members in enumerate(chunks):
            chunk_of[members] = c
    branch_of = torch.full((n,), -1, dtype=torch.long)
    if branches:
        spaces = sorted(groupset.removable_spaces)
        for g in groupset.groups:
            names = {space for space, _ in g.channels}
            if len(names) == 1 and (space := names.pop()) in groupset.removable_spaces:
                branch_of[g.id] = spaces.index(space)
    first = next(model.parameters())
    bank = GateBank(n, branch_of, form, init_logit, chunk_of)
    hooked = gated_modules(model, groupset)
    modules = dict(model.named_modules())
    seen = torch.bincount(torch.cat([i[i < n] for i in hooked.values()]), minlength=n) if hooked else None
    for name, index in hooked.items():
        key = None
        if dynamic and isinstance(modules[name], nn.BatchNorm2d):
            own = index[index < n].unique()
            # groups gated here alone (a per-sample gate stays exact) that a gate may close; sorted
            local = own[(seen[own] == 1) & (bank.chunk_of[own] >= 0)]
            if len(local):
                key = _key(name)
                bank.add_head(key, index, local)
        modules[name].register_forward_hook(GateHook(bank, index, key))
    bank.to(first.device)
    model.add_module(BANK_NAME, bank)
    return bank


def bank_of(model: nn.Module) -> GateBank | None:
    return getattr(model, BANK_NAME, None)


def remove_gates(model: nn.Module) -> None:
    """Take the bank and every gate hook off `model` (the gates' values must already be folded)."""
    for module in model.modules():
        for handle_id, hook in list(module._forward_hooks.items()):
            if isinstance(hook, GateHook):
                del module._forward_hooks[handle_id]
    if hasattr(model, BANK_NAME):
        delattr(model, BANK_NAME)
