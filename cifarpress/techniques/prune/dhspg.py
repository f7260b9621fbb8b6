"""DHSPG (dual half-space projected gradient, OTOv2) as a Trainer plug-in: HESSO's alternative.

Once, at the first step after `start_fraction` of the run, the lowest-saliency groups that
meet the target are marked redundant (same saliency and budget as HESSO). Until
`end_fraction` of the run, after every ordinary SGD step (x_old -> x_new) each redundant
group gets

    group-lasso step   x_new -= (lr * lambda_ + amplify * max(0, <x_new - x_old, u>)) * u,
                       u = x_old / ||x_old||: the gradient of lambda_ * ||x|| plus, when the
                       step pushed the group outward, twice that push, so the group shrinks
                       every step whatever the loss wants (OTOv2's adaptive lambda, simplified);
    half-space test    if <x_new, x_old> < epsilon * ||x_old||^2, the group is set to exactly
                       zero and frozen there (epsilon = 0: when the step would cross the origin).

Unlike HESSO the count is not forced: a group reaches zero only when the penalty wins, so
lambda_ must be large enough for lr * lambda_ * (window steps) to exceed the redundant
groups' norms (about 1 to 3 for CIFAR ResNets). Redundant groups still nonzero at the end
of the window are released and train on. `finalize` cuts the frozen groups, rounded down to
`channel_multiple` widths per unit (surplus zero channels stay in, still exact).
"""
from __future__ import annotations

import torch

from cifarpress.channels.budget import PruneTarget
from cifarpress.errors import CifarpressError
from cifarpress.techniques.prune.pruner import GroupPruner, saliency
from cifarpress.train.trainer import Trainer


class DhspgPruner(GroupPruner):
    name = "dhspg"

    def __init__(self, target: PruneTarget, *, start_fraction: float = 0.1, end_fraction: float = 0.8,
                 lambda_: float = 0.1, epsilon: float = 0.0, amplify: float = 2.0):
        super().__init__(target, start_fraction=start_fraction, end_fraction=end_fraction)
        if not lambda_ > 0:
            raise CifarpressError(f"lambda_ must be > 0, got {lambda_!r}")
        if not 0.0 <= epsilon < 1.0:
            raise CifarpressError(f"epsilon must lie in [0, 1), got {epsilon!r}")
        if not amplify >= 0:
            raise CifarpressError(f"amplify must be >= 0, got {amplify!r}")
        self.lambda_ = lambda_
        self.epsilon = epsilon
        self.amplify = amplify
        self._old: list[torch.Tensor] | None = None

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if self.end_step < self.start_step + 2:
            raise CifarpressError(
                f"dhspg needs at least 2 steps between start_fraction {self.start_fraction:g} and end_fraction "
                f"{self.end_fraction:g} of this {self.total_steps}-step run; widen them or train longer")

    def _penalizing(self, step: int) -> bool:
        """Whether optimizer step number `step` (1-based) is followed by the projection."""
        return self.start_step + 2 <= step <= self.end_step and bool(self.redundant)

    def before_step(self, trainer: Trainer, images, labels) -> None:
        # x_old is the weights this step starts from; taken before the step, so a resumed run
        # needs no copy of it in the checkpoint
        if self._penalizing(trainer.step + 1):
            self._old = [p.detach().clone() for p in self.rows.params]

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        step = trainer.step
        if step == self.start_step + 1 and not self.redundant and not self.frozen:
            self.redundant = set(self.budget.select(saliency(self.rows), (), 1.0))
        elif self._penalizing(step) and self._old is not None:
            self._project(self._old)
        self._old = None
        if step >= self.end_step:
            self.redundant = set()  # the window is over: survivors train on freely
        self.hold_frozen_at_zero()

    def _project(self, old: list[torch.Tensor]) -> None:
        rows, params = self.rows, self.rows.params
        active = self.group_mask(self.redundant)
        norm_sq = rows.per_group([o * o for o in old])
        norm = norm_sq.sqrt()
        outward = rows.per_group([(p - o) * o for p, o in zip(params, old)]) / norm.clamp(min=1e-12)
        lr = self.optimizer.param_groups[0]["lr"]  # the scheduler already set the next step's rate
        shrink = lr * self.lambda_ + self.amplify * outward.clamp(min=0)
        coef = torch.where(active & (norm > 0), shrink / norm.clamp(min=1e-12), torch.zeros_like(norm))
        for i, (p, o) in enumerate(zip(params, old)):
            p.sub_(rows.expand(i, coef.to(p.dtype), 0.0) * o)
        inner = rows.per_group([p * o for p, o in zip(params, old)])
        crossed = active & ((inner < self.epsilon * norm_sq) | (norm_sq == 0))
        self.freeze(crossed.nonzero().flatten().tolist())
