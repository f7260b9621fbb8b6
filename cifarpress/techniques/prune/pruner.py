"""What the group-sparsity optimizers HESSO (hesso.py) and DHSPG (dhspg.py) share.

`GroupPruner` is their common Trainer plug-in base: the step budget, the redundant and
frozen groups, the metric, finalize and resume state. `GroupParams` binds the groups'
producer rows to a model's live parameters, and `saliency` ranks the groups.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from cifarpress.channels.budget import PruneBudget, PruneTarget
from cifarpress.channels.groups import GroupSet, discover_groups, eval_mode
from cifarpress.channels.surgery import compact_model
from cifarpress.errors import CifarpressError
from cifarpress.train.phases import Phase
from cifarpress.train.trainer import Plugin, Trainer
from cifarpress.utils.modules import unwrap


def planned_steps(trainer: Trainer) -> int:
    """Optimizer steps the Trainer will take in the whole run: `trainer.total_steps`, which
    Trainer.fit sets before calling the plug-ins' setup()."""
    total = getattr(trainer, "total_steps", None)
    if total is None:
        raise CifarpressError("the pruner needs the run's step count, which Trainer.fit sets before setup(); "
                              "use it as a plug-in of Trainer.fit")
    return int(total)


def check_fraction(name: str, value: float, low: float, high: float, high_inclusive: bool = False) -> None:
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise CifarpressError(f"{name} must lie in [{low:g}, {high:g}{bracket}, got {value!r}")


class GroupParams:
    """The producer rows of every group, bound to one model's live parameters.

    Per-group quantities are sums over rows (`per_group`), and updates broadcast one value
    per group onto its rows (`expand`), so a step costs a few passes over the producer
    tensors whatever their layout (channels_last included).
    """

    def __init__(self, model: nn.Module, groupset: GroupSet):
        self.n = len(groupset)
        self.entries = []  # (param, dim, group_of incl. -1, rows inside groups, their owners)
        self.consumers = []  # the same for the slices that read the groups' channels; only zero() touches them
        for role in groupset.roles:
            if role.kind in ("producer", "consumer"):
                p = model.get_parameter(role.param)
                group_of = role.group_of.to(p.device)
                inside = (group_of >= 0).nonzero().flatten()
                entry = (p, role.dim, group_of, inside, group_of[inside])
                (self.entries if role.kind == "producer" else self.consumers).append(entry)

    @property
    def params(self) -> list[nn.Parameter]:
        return [e[0] for e in self.entries]

    def per_group(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Sum of `values[i]` (shaped like entry i's parameter) over each group's rows, float32."""
        out = torch.zeros(self.n, device=self.entries[0][0].device)
        for (p, dim, _, inside, owner), v in zip(self.entries, values):
            rows = v.detach().float().movedim(dim, 0).reshape(v.shape[dim], -1).sum(1)
            out.index_add_(0, owner, rows[inside])
        return out

    def expand(self, i: int, per_group: torch.Tensor, outside) -> torch.Tensor:
        """`per_group` laid on entry i's rows (`outside` for rows no group owns), broadcastable to it."""
        return self._laid(self.entries[i], per_group, outside)

    @staticmethod
    def _laid(entry, per_group: torch.Tensor, outside) -> torch.Tensor:
        p, dim, group_of, _, _ = entry
        padded = torch.cat([per_group, per_group.new_full((1,), outside)])
        shape = [1] * p.dim()
        shape[dim] = p.shape[dim]
        return padded[group_of].view(shape)  # -1 picks the padding

    @torch.no_grad()
    def scale(self, factor: torch.Tensor) -> None:
        for i, (p, *_rest) in enumerate(self.entries):
            p.mul_(self.expand(i, factor.to(p.dtype), 1.0))

    @torch.no_grad()
    def zero(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        """Rows of the masked groups to exactly 0 in the weights, the gradients and every optimizer
        state shaped like the weight (SGD momentum; Adam's moments), so nothing regrows them; and the
        consumer slices reading them, which multiply zeros (GroupSet.zero_groups says why)."""
        for entry in self.entries + self.consumers:
            p = entry[0]
            rows = self._laid(entry, mask, False)
            p.masked_fill_(rows, 0.0)
            if p.grad is not None:
                p.grad.masked_fill_(rows, 0.0)
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(rows, 0.0)


SALIENCIES = ("magnitude-taylor", "fisher")


def group_taylor(rows: GroupParams) -> torch.Tensor:
    """Sum of grad * weight over each group's rows, from the gradients of the step just taken: the
    first-order change of the loss if the group were set to zero."""
    return rows.per_group([p * p.grad if p.grad is not None else torch.zeros_like(p) for p in rows.params])


def saliency(rows: GroupParams, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each group, in [0, 1].

    Without `fisher`, the mean of two criteria, each divided by its maximum:
    magnitude  RMS of the group's producer values (size-free: a 64-channel stream's group
               holds more weights than an inner conv's, which says nothing about importance);
    taylor     |sum of grad * weight| over the group, from the step just taken.
    With `fisher` (the mean over many steps of the squared group Taylor term, Molchanov et al.
    2019), that alone, divided by its maximum: an estimate of the loss increase if the group
    went, comparable across layers of any weight scale, and far less noisy than one step's.
    """
    if fisher is not None:
        fisher = torch.nan_to_num(fisher, nan=0.0, posinf=0.0)
        return fisher / fisher.max().clamp(min=1e-30)
    params = rows.params
    sq = rows.per_group([p * p for p in params])
    count = rows.per_group([torch.ones_like(p) for p in params])
    magnitude, taylor = (sq / count.clamp(min=1)).sqrt(), group_taylor(rows).abs()
    if not torch.isfinite(taylor).all():  # an AMP step skipped for inf gradients: magnitude alone
        taylor = torch.zeros_like(taylor)
    return 0.5 * (magnitude / magnitude.max().clamp(min=1e-12) + taylor / taylor.max().clamp(min=1e-12))


class GroupPruner(Plugin):
    """Shared base of the group-sparsity optimizers: groups, budget, frozen zeros, finalize, resume.

    Subclasses set `redundant` (groups being driven to zero) and move finished ones to `frozen`.
    Groups are found in setup on the model as it is then, so a plug-in that replaces the model
    must come before the pruner. So must an EMA: finalize then cuts the model EMA hands on,
    with the pruned groups set to exactly zero in it.
    """

    name = "group-pruner"
    phase = Phase.RESHAPE
    shown_metrics = ("group_sparsity",)

    def __init__(self, target: PruneTarget, *, start_fraction: float = 0.1, end_fraction: float = 0.5):
        if not isinstance(target, PruneTarget):
            raise TypeError(f"target must be a PruneTarget, got {type(target).__name__}")
        check_fraction("start_fraction", start_fraction, 0.0, 1.0)
        check_fraction("end_fraction", end_fraction, 0.0, 1.0, high_inclusive=True)
        if end_fraction <= start_fraction:
            raise CifarpressError(f"end_fraction ({end_fraction:g}) must exceed start_fraction ({start_fraction:g})")
        self.target = target
        self.start_fraction = start_fraction
        self.end_fraction = end_fraction
        self.redundant: set[int] = set()
        self.frozen: set[int] = set()
        self.model: nn.Module | None = None
        self.groupset: GroupSet | None = None
        self.budget: PruneBudget | None = None
        self.rows: GroupParams | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._frozen_mask: torch.Tensor | None = None
        self.input_shape: tuple[int, ...] = (3, 32, 32)  # one image's, from the Trainer in setup

    # -- hooks --------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        self.model = unwrap(trainer.model)
        # one image's shape as the data has it (Trainer.fit sets it); the probes trace and check the cut on it
        self.input_shape = tuple(getattr(trainer, "input_shape", None) or self.input_shape)
        x = self._probe_input(2)  # two images: a norm traced in training mode needs two values per channel
        self.groupset = discover_groups(self.model, x)
        self.budget = PruneBudget(self.model, self.groupset, self.target, x)
        self.rows = GroupParams(self.model, self.groupset)
        self.total_steps = planned_steps(trainer)
        self.start_step = round(self.start_fraction * self.total_steps)
        self.end_step = round(self.end_fraction * self.total_steps)

    def configure_optimizer(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizer = optimizer  # kept only to zero the frozen rows' momentum
        return optimizer

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        metrics["group_sparsity"] = len(self.groupset.zero_group_ids(self.model)) / len(self.groupset)

    def finalize(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        cut = self.budget.levelled(self.frozen)
        if not cut:
            warnings.warn(f"{self.name}: no group reached zero, so the model is handed on uncut", stacklevel=2)
            return model
        self.groupset.zero_groups(model, cut)  # a no-op on the trained model; exact zeros on an EMA copy
        x = self._probe_input(4, like=model)
        with eval_mode(model):
            scale = model(x).abs().max().item()
        # 1e-4 absolute fails on huge logits through float32 rounding; scale it with them
        return compact_model(model, self.groupset, group_ids=cut, check_input=x, atol=1e-4 * max(1.0, scale))

    def state_dict(self) -> dict:
        return {"redundant": sorted(self.redundant), "frozen": sorted(self.frozen)}

    def load_state_dict(self, state: dict) -> None:
        self.redundant = set(state.get("redundant", ()))
        self.frozen = set(state.get("frozen", ()))
        self._frozen_mask = None

    # -- shared mechanics ---------------------------------------------------------------
    @property
    def pruned_ids(self) -> list[int]:
        return sorted(self.frozen)

    def freeze(self, ids) -> None:
        self.frozen |= set(int(g) for g in ids)
        self.redundant -= self.frozen
        self._frozen_mask = None

    def hold_frozen_at_zero(self) -> None:
        if not self.frozen:
            return
        if self._frozen_mask is None:
            mask = torch.zeros(len(self.groupset), dtype=torch.bool)
            mask[sorted(self.frozen)] = True
            self._frozen_mask = mask.to(self.rows.entries[0][0].device)
        self.rows.zero(self._frozen_mask, self.optimizer)

    def group_mask(self, ids) -> torch.Tensor:
        mask = torch.zeros(len(self.groupset), dtype=torch.bool)
        mask[sorted(ids)] = True
        return mask.to(self.rows.entries[0][0].device)

    def _probe_input(self, batch: int, like: nn.Module | None = None) -> torch.Tensor:
        # private generator: the pruner must not move the global RNG the run's determinism rests on
        x = torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0))
        first = next((like or self.model).parameters())
        return x.to(first.device, first.dtype)
