"""The `distill:` add-on's knobs, defined once (torch-free). Distillation.from_config takes it as it is."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DistillConfig(BaseModel):
    """Distillation from a teacher, as a loss added to a training stage."""

    model_config = ConfigDict(extra="forbid")

    teacher: Optional[str] = Field(None, description="Model file or builtin:NAME; omitted = the model entering the stage")
    method: Literal["kd", "dkd", "nkd"] = "kd"
    weight: Optional[float] = Field(None, ge=0, description="Distillation term weight (kd 0.9, dkd/nkd 1)")
    label_weight: Optional[float] = Field(None, ge=0, description="Cross-entropy weight (kd 0.1, dkd/nkd 1)")
    temperature: Optional[float] = Field(None, gt=0, description="kd/dkd 4, nkd 1")
    alpha: float = Field(1.0, ge=0, description="DKD: target-class term weight")
    beta: float = Field(8.0, ge=0, description="DKD: non-target term weight")
    gamma: float = Field(1.5, ge=0, description="NKD: non-target term weight")
    warmup_epochs: Optional[float] = Field(None, ge=0, description="Linear ramp of the term (default: dkd epochs/12)")

    @model_validator(mode="after")
    def method_specific(self):
        for name, method in (("alpha", "dkd"), ("beta", "dkd"), ("gamma", "nkd")):
            if name in self.model_fields_set and self.method != method:
                raise ValueError(f"{name} applies only to method {method}, not {self.method}")
        return self
