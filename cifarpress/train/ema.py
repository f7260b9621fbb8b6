"""Exponential moving average of the weights (Polyak averaging).

Evaluates and hands on the averaged copy. Every floating-point entry of the
state dict is averaged, BN running statistics included (so they follow the
averaged weights rather than the live ones); integer buffers such as
num_batches_tracked are copied.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from cifarpress.train.phases import Phase
from cifarpress.train.trainer import Plugin, Trainer
from cifarpress.utils.modules import unwrap


class WeightEMA(Plugin):
    name = "ema"
    phase = Phase.AVERAGE

    def __init__(self, decay: float = 0.999, every: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.every = every
        self.shadow: nn.Module | None = None
        self.updates = 0
        self._pending: dict | None = None

    def setup(self, trainer: Trainer) -> None:
        self.shadow = copy.deepcopy(unwrap(trainer.model)).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)
        if self._pending is not None:
            self.shadow.load_state_dict(self._pending)
            self._pending = None

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.every:
            return
        self.updates += 1
        # Short runs: ramp the decay up so early weights do not dominate.
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = unwrap(trainer.model).state_dict()
        for name, value in self.shadow.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(live[name].detach(), alpha=1 - d)
            else:
                value.copy_(live[name])

    def eval_model(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        return self.shadow

    def finalize(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        return self.shadow

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow.state_dict() if self.shadow else None}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state.get("updates", 0)
        if state.get("shadow") is not None:
            if self.shadow is None:
                self._pending = state["shadow"]
            else:
                self.shadow.load_state_dict(state["shadow"])


def build(enabled: bool, context) -> WeightEMA | None:
    """The catalogue's `ema: true` add-on."""
    return WeightEMA() if enabled else None
