"""HESSO (Hybrid Efficient Structured Sparse Optimizer, OTOv3) as a Trainer plug-in.

Schedule over the run's optimizer steps:

    warm-up   the first `start_fraction` of the steps train as usual;
    periods   the steps up to `end_fraction` are split into `pruning_periods` periods. At the
              first step of each, the lowest-saliency groups are marked redundant (saliency
              "fisher", the default: squared group Taylor terms averaged over the steps since the
              last choice; "magnitude-taylor": the current step's terms), so many that
              after period p the cut meets (p+1)/periods of the target (whole chunks, see
              targets.py). During the period each step multiplies their producer rows by
              (T-t-1)/(T-t) after the ordinary SGD step, so a row ends the period at exactly 0
              whatever the gradients did meanwhile (the product of the factors is 0), while the
              rest of the network adapts to the fading channels;
    frozen    from then on those rows, their gradients and their momentum are set to 0 after
              every step; the last period lands exactly on the target;
    fine-tune the remaining steps train the survivors with the baseline's own SGD (momentum,
              weight decay, learning-rate schedule are the Trainer's, untouched).

`finalize` cuts the frozen groups with `compact_model` and returns the smaller model.

What HESSO and DHSPG (dhspg.py) share (step budget, frozen groups, metric, finalize,
resume state) lives in pruner.py.
"""
from __future__ import annotations

import torch

from cifarpress.channels.budget import PruneTarget
from cifarpress.errors import CifarpressError
from cifarpress.techniques.prune.pruner import (
    SALIENCIES,
    GroupPruner,
    group_taylor,
    saliency,
)
from cifarpress.train.trainer import Trainer


class HessoPruner(GroupPruner):
    """HESSO: redundant groups chosen by saliency in `pruning_periods` periods, faded to zero, frozen.

    `target` says how much to cut (targets.PruneTarget); the run's length comes from the
    Trainer (`trainer.total_steps`).
    """

    name = "hesso"

    def __init__(self, target: PruneTarget, *, start_fraction: float = 0.05, end_fraction: float = 0.3,
                 pruning_periods: int = 5, saliency: str = "fisher"):
        super().__init__(target, start_fraction=start_fraction, end_fraction=end_fraction)
        if saliency not in SALIENCIES:
            raise CifarpressError(f"hesso saliency must be one of {', '.join(SALIENCIES)}, got {saliency!r}")
        self.saliency = saliency
        self.fisher: torch.Tensor | None = None  # summed squared group Taylor terms since the last selection
        self.fisher_steps = 0
        self._redundant_mask: tuple[tuple[int, ...], torch.Tensor] | None = None  # (ids, bool mask on the device)
        if isinstance(pruning_periods, bool) or not isinstance(pruning_periods, int) or pruning_periods < 1:
            raise CifarpressError(f"pruning_periods must be an integer >= 1, got {pruning_periods!r}")
        self.pruning_periods = pruning_periods

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        self.period_steps = (self.end_step - self.start_step) // self.pruning_periods
        if self.period_steps < 1:
            raise CifarpressError(
                f"hesso has {self.end_step - self.start_step} steps between start_fraction {self.start_fraction:g} "
                f"and end_fraction {self.end_fraction:g} of this {self.total_steps}-step run, fewer than "
                f"pruning_periods ({self.pruning_periods}); lower pruning_periods or train longer")

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        k = trainer.step - self.start_step - 1  # index of this step inside the pruning window
        window = self.pruning_periods * self.period_steps
        if self.saliency == "fisher" and k < window:
            taylor = group_taylor(self.rows)
            if torch.isfinite(taylor).all():  # an AMP step skipped for inf gradients adds nothing
                self.fisher = taylor.square() if self.fisher is None else self.fisher.to(taylor) + taylor.square()
                self.fisher_steps += 1
        if 0 <= k < window:
            period, t = divmod(k, self.period_steps)
            if t == 0:
                progress = (period + 1) / self.pruning_periods
                fisher = None
                if self.saliency == "fisher" and self.fisher is not None:
                    fisher, self.fisher, self.fisher_steps = self.fisher / self.fisher_steps, None, 0
                chosen = self.budget.select(saliency(self.rows, fisher), self.frozen, progress)
                self.redundant = set(chosen) - self.frozen
            if self.redundant:
                # the mask is built once per period: indexing with a list copies it to the device, a host sync
                ids = tuple(sorted(self.redundant))
                if self._redundant_mask is None or self._redundant_mask[0] != ids:
                    self._redundant_mask = (ids, self.group_mask(ids))
                factor = torch.ones(len(self.groupset), device=self.rows.entries[0][0].device)
                factor.masked_fill_(self._redundant_mask[1], (self.period_steps - t - 1) / (self.period_steps - t))
                self.rows.scale(factor)
            if t == self.period_steps - 1:
                self.freeze(self.redundant)  # now exactly zero: the last factor was 0
        self.hold_frozen_at_zero()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.fisher is not None:  # a period's accumulation survives an interrupted run
            state.update(fisher=self.fisher.cpu().tolist(), fisher_steps=self.fisher_steps)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        fisher = state.get("fisher")
        self.fisher = None if fisher is None else torch.tensor(fisher, dtype=torch.float32)
        self.fisher_steps = int(state.get("fisher_steps", 0))
