"""Consensus gating: learned binary gates and a polarization regularizer reach a set sparsity in one pass.

A reconstruction of "Learning a Consensus Sub-Network with Polarization Regularization and One Pass
Training" (Zhi et al., arXiv 2302.10798), whose code and exact formulas are not published, from the
nearest published forms:

    gates         one per chunk of zero-invariant groups (the step between two allowed widths, the
                  least important groups of the starting model first) and one per removable residual
                  branch (gates.py), hard 0/1 with a straight-through gradient, or ChipNet's annealed
                  continuous Heaviside;
                  `gates: dynamic` adds per-sample heads and a consensus term (the variance of each
                  gate across the batch) so every input agrees on one static sub-network;
    polarization  Zhuang et al. (NeurIPS 2020): t * mean(p) - mean|p - mean(p)|, which pushes each
                  gate to 0 or 1 while t > 1 keeps a pull towards closing; or `bimodal`, 4 mean p(1-p);
    budget        ChipNet's (ratio - target)^2 on the MACs the soft gates keep, counted exactly with
                  input-channel coupling (a conv loses p_in * p_out of its products), or on the share
                  of groups kept for a `sparsity` target.

Schedule over the run's optimizer steps: the gates and their losses train from `start_fraction`
to `end_fraction`; then the mask freezes: gates ranked by probability (dynamic ones by their
running batch mean), the cut grown from the lowest against the real MAC counter until the target
is met on the widths `channel_multiple` allows (PruneBudget.select), the cut groups' producers set
to zero and held there, the rest fine-tune with every gate at 1. `finalize` removes the gates and
cuts the frozen groups with the shared surgery, so no gate op reaches the exported graph.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from cifarpress.channels.budget import PruneTarget
from cifarpress.errors import CifarpressError
from cifarpress.techniques.prune.gates import GATE_FORMS, GateBank, attach_gates, bank_of, remove_gates
from cifarpress.techniques.prune.pruner import GroupPruner, saliency
from cifarpress.train.trainer import Trainer
from cifarpress.utils.modules import unwrap

POLARIZATIONS = ("zhuang", "bimodal")


class SoftMacs(nn.Module):
    """MACs per image as a differentiable function of each group's keep probability.

    The MacCounter's layers, with every slot's width replaced by its expected width: the fixed
    channels plus the sum of the probabilities of the groups it holds."""

    def __init__(self, counter):
        super().__init__()
        n_groups = len(counter.touches)
        counts = torch.zeros(max(counter.n_slots, 1), n_groups)
        for g, touches in enumerate(counter.touches):
            for slot, c in touches:
                counts[slot, g] += c
        self.register_buffer("counts", counts)
        self.layers = [(macs, [(slot, shape[d]) for d, slot in slots]) for macs, shape, slots in counter.layers]
        self.fixed, self.full = counter.fixed, counter.full

    def forward(self, keep: torch.Tensor) -> torch.Tensor:
        lost = self.counts.to(keep) @ (1.0 - keep)
        # new_zeros/new_ones + Python numbers: new_tensor(x) on CUDA is a host-to-device copy, a sync per layer
        total = keep.new_zeros(()) + float(self.fixed)
        for macs, slots in self.layers:
            share = keep.new_ones(())
            for slot, width in slots:
                share = share * (1.0 - lost[slot] / width)
            total = total + macs * share
        return total / self.full


class GatingPruner(GroupPruner):
    """Gates trained with a polarization and a budget loss, frozen into a static mask, then cut."""

    name = "gating"
    shown_metrics = ("gate_sparsity", "gate_polarization", "macs_kept")

    def __init__(self, target: PruneTarget, *, start_fraction: float = 0.0, end_fraction: float = 0.5,
                 gates: str = "static", form: str = "hard", polarization: str = "zhuang",
                 polarization_weight: float = 1.0, polarization_t: float = 1.4, budget_weight: float = 30.0,
                 consensus_weight: float = 1.0, gate_lr: float = 0.01, init_logit: float = 3.0):
        super().__init__(replace(target, selection="score"), start_fraction=start_fraction,
                         end_fraction=end_fraction)
        for name, value in (("polarization_weight", polarization_weight), ("budget_weight", budget_weight),
                            ("consensus_weight", consensus_weight), ("gate_lr", gate_lr)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise CifarpressError(f"gating {name} must be a number >= 0, got {value!r}")
        if gates not in ("static", "dynamic"):
            raise CifarpressError(f"gating gates must be static or dynamic, got {gates!r}")
        if form not in GATE_FORMS:
            raise CifarpressError(f"gating form must be one of {', '.join(GATE_FORMS)}, got {form!r}")
        if polarization not in POLARIZATIONS:
            raise CifarpressError(f"gating polarization must be one of {', '.join(POLARIZATIONS)}, "
                                  f"got {polarization!r}")
        self.gates, self.form, self.polarization = gates, form, polarization
        self.polarization_weight, self.polarization_t = float(polarization_weight), float(polarization_t)
        self.budget_weight, self.consensus_weight = float(budget_weight), float(consensus_weight)
        self.gate_lr, self.init_logit = float(gate_lr), float(init_logit)
        self.bank: GateBank | None = None
        self.soft_macs: SoftMacs | None = None

    # -- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        if bank_of(unwrap(trainer.model)) is not None:
            raise CifarpressError("this model already carries gates (cifarpress_gates); use one gating plug-in")
        super().setup(trainer)
        # chunks ranked by the starting weights' magnitude; a resume's load then restores the bank's own
        chunks = self.budget.gate_chunks(saliency(self.rows))
        self.bank = attach_gates(self.model, self.groupset, form=self.form, dynamic=self.gates == "dynamic",
                                 branches=self.target.remove_branches, init_logit=self.init_logit, chunks=chunks)
        if self.target.macs is not None:
            self.soft_macs = SoftMacs(self.budget.mac_counter).to(self.bank.logits.device)
            self.goal = self.budget.goal_macs / self.budget.mac_counter.full
        else:
            self.goal = 1.0 - self.budget.goal_groups / len(self.groupset)

    def configure_optimizer(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        super().configure_optimizer(trainer, optimizer)
        self.gate_params = [self.bank.logits, self.bank.branch_logits]
        own = {id(p) for p in self.gate_params}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in own]
        # their own rate (the schedule still scales it), as their gradients are normalized (before_optimizer_step)
        optimizer.add_param_group({"params": self.gate_params, "weight_decay": 0.0, "lr": self.gate_lr})
        return optimizer

    def _in_window(self, step: int) -> bool:
        return self.start_step <= step < self.end_step and not self.bank.is_frozen()

    def before_step(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not self.bank.has_frozen_note():  # once (after a resume's load too): forwards then skip the device read
            self.bank.note_frozen()
        if self.form == "annealed":  # gamma from 1 to 1000, geometrically over the window
            span = max(1, self.end_step - self.start_step)
            progress = min(1.0, max(0.0, (trainer.step - self.start_step) / span))
            self.bank.sharpness = 1000.0 ** progress

    def loss(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor,
             logits: torch.Tensor) -> torch.Tensor | None:
        samples, self.bank.samples = self.bank.samples, []
        if not self._in_window(trainer.step):
            return None
        keep = self.bank.probs()
        extra = keep.new_zeros(())
        if samples:  # dynamic groups: their batch mean counts against the budget
            spread = []
            for ids, p in samples:
                mean = p.mean(0)
                keep = keep.index_copy(0, ids, mean)
                spread.append(p.var(0, unbiased=False))
                with torch.no_grad():
                    self.bank.agreed[ids] = 0.9 * self.bank.agreed[ids] + 0.1 * mean.detach()
            extra = extra + self.consensus_weight * torch.cat(spread).mean()
        ratio = self.soft_macs(keep) if self.soft_macs is not None else keep.mean()
        extra = extra + self.budget_weight * (ratio - self.goal) ** 2
        gates = torch.cat([torch.sigmoid(self.bank.logits), torch.sigmoid(self.bank.branch_logits)])
        if self.polarization == "zhuang":
            polar = self.polarization_t * gates.mean() - (gates - gates.mean()).abs().mean()
        else:
            polar = 4.0 * (gates * (1 - gates)).mean()
        return extra + self.polarization_weight * polar

    @torch.no_grad()
    def before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        if not self._in_window(trainer.step):  # outside the window the gates stay as they are
            for p in self.bank.parameters():
                p.grad = None
            return
        # Unit RMS over all gates: how fast they move is the gate learning rate's alone, whatever the
        # number of groups, the loss weights' overall scale or an AMP loss scale.
        grads = [p.grad for p in self.gate_params if p.grad is not None and p.numel()]
        if grads:
            rms = torch.cat([g.flatten() for g in grads]).square().mean().sqrt().clamp(min=1e-12)
            for g in grads:
                g.div_(rms)

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        if trainer.step >= self.end_step and not self.bank.is_frozen():
            self.freeze_mask()
        self.hold_frozen_at_zero()

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        super().on_epoch_end(trainer, epoch, metrics)
        with torch.no_grad():
            p = self.bank.agreed_probs()
            closed = (p <= 0.5).nonzero().flatten().tolist() if not self.bank.is_frozen() else self.pruned_ids
            metrics["gate_sparsity"] = len(closed) / len(self.groupset)
            metrics["gate_polarization"] = float(((p < 0.05) | (p > 0.95)).float().mean())
            metrics["macs_kept"] = self.budget.compact_macs(self.budget.levelled(closed)) / self.budget.mac_counter.full

    def finalize(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        if not self.bank.is_frozen():  # a run shorter than the window: freeze what the gates say now
            with torch.no_grad():
                self.freeze_mask()
        remove_gates(model)  # the live model's, or an EMA copy's own bank and hooks
        remove_gates(self.model)
        return super().finalize(trainer, model)

    # -- the freeze -------------------------------------------------------------------------------
    @torch.no_grad()
    def freeze_mask(self) -> None:
        """Cut the lowest-probability gates until the target is met exactly; the rest open for good."""
        chosen = self.budget.select(self.bank.agreed_probs(), set())
        self.freeze(chosen)  # held at zero from this step on (after_step); finalize zeroes the model it cuts
        self.bank.keep.copy_(~self.group_mask(chosen))
        self.bank.frozen.fill_(True)
        self.bank.note_frozen(True)


