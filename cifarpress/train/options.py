"""The training-loop settings, defined once (torch-free): recipe stages, the single-stage commands and
`cifarpress train` all validate against this model, and the Trainer's TrainConfig is built from it.

Two sets of defaults exist on purpose, both here: fine-tuning a trained model (a recipe's training
stages: small lr, cosine decay, no warm-up) and training from scratch (`cifarpress train`: the
one-cycle schedule the shipped baselines were trained with, scripts/retrain_baselines.sh)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class TrainingOptions(BaseModel):
    """The training-loop settings every training stage shares (defaults: fine-tuning)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["onecycle", "cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, le=0.5)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)
    seed: int = 0

    def training_options(self) -> dict:
        return {name: getattr(self, name) for name in TrainingOptions.model_fields}


# `cifarpress train` from random weights: what differs from the fine-tuning defaults above.
FROM_SCRATCH = {"epochs": 30, "lr": 0.2, "schedule": "onecycle", "warmup_fraction": 0.15}


def from_scratch(name: str):
    """The default of one training setting when training from scratch (TrainConfig's, `cifarpress train`'s)."""
    return FROM_SCRATCH.get(name, TrainingOptions.model_fields[name].default)
