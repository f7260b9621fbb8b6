"""The `quantize` stage's knobs, defined once (torch-free); `method` chooses the quantizer.

Each quantizer's build() takes its config as it is."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TernaryQuantConfig(BaseModel):
    """Quantization-aware training: BitNet b1.58 ternary weights ({-1, 0, +1} x scale)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ternary"] = "ternary"
    scale: Literal["absmean", "absmedian"] = "absmean"
    granularity: Literal["tensor", "channel"] = "tensor"
    act_bits: Optional[Literal[8]] = Field(None, description="8 to quantize layer inputs to int8; omit for float")
    act_granularity: Literal["tensor", "sample"] = "tensor"
    keep: Optional[list[str]] = Field(None, description="Layers kept at 8 bits (default: first conv and classifier)")
    warmup_steps: int = Field(0, ge=0, description="Steps blending from full precision to ternary")


# AdaPT's two presets: the paper's rule, and a deploy mode that lets layers reach int8 or fewer bits. A field
# left out takes its mode's value; one given overrides it.
ADAPT_MODES = {
    "paper": {"min_bits": 12, "max_bits": 32, "buffer_bits": 8, "min_resolution": 50, "max_resolution": 150,
              "tolerance": "sampling", "sampling_floor": False, "activations": "fixed", "settle_fraction": 0.0},
    "deploy": {"min_bits": 4, "max_bits": 16, "buffer_bits": 0, "min_resolution": 16, "max_resolution": 16,
               "tolerance": 0.003, "sampling_floor": True, "activations": "int8", "settle_fraction": 0.3},
}


class AdaptQuantConfig(BaseModel):
    """AdaPT: per-layer fixed-point weights <WL, FL> whose precision moves during training (PushDown to the
    narrowest format that loses no information, PushUp when gradients lose their direction)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["adapt"] = "adapt"
    mode: Literal["paper", "deploy"] = Field(
        "paper", description="adapt: the paper's rule (words >= 12 bits: an 8-bit result buffer) or deploy (no "
        "buffer, 4-16 bits, coarse 16-bin histograms with a 0.003-nat tolerance, never below the sampling floor, "
        "int8 inputs), so layers can reach int8")
    min_bits: Optional[int] = Field(None, ge=2, le=32, description="adapt: narrowest word (paper 12, deploy 4)")
    max_bits: Optional[int] = Field(None, ge=2, le=32, description="adapt: widest word, the start (paper 32, "
                                    "deploy 16)")
    buffer_bits: Optional[int] = Field(None, ge=0, le=31, description="adapt: result buffer RB, WL >= FL + RB "
                                       "(paper 8, deploy 0)")
    min_lookback: int = Field(25, ge=1, description="adapt: shortest window of steps between switches")
    max_lookback: int = Field(100, ge=1, description="adapt: longest window")
    lookback_momentum: float = Field(1.0, gt=0, le=1, description="adapt: blend of the new lookback (1: no "
                                     "memory, the paper's ResNet setting)")
    min_resolution: Optional[int] = Field(None, ge=2, description="adapt: fewest histogram bins (paper 50, "
                                          "deploy 16)")
    max_resolution: Optional[int] = Field(None, ge=2, description="adapt: most histogram bins (paper 150, "
                                          "deploy 16)")
    tolerance: Optional[Union[float, str]] = Field(
        None, description="adapt: KL divergence (nats) that still counts as no information loss: a number, or "
        "sampling (each tensor's histogram sampling floor, (bins - 1) / 2N for N weights; paper) (deploy 0.003)")
    sampling_floor: Optional[bool] = Field(
        None, description="adapt: a KL under the tensor's histogram sampling floor always counts as no loss, "
        "whatever tolerance says, so small layers (the first conv, the classifier) are not held wide by histogram "
        "noise (paper false: its tolerance is the floor; deploy true)")
    settle_fraction: Optional[float] = Field(
        None, ge=0, le=1, description="adapt: last share of the steps with PushUp off, so the layers settle at "
        "their narrowest lossless format and train there (paper 0, deploy 0.3)")
    strategy: Literal["min", "mean", "max"] = Field("min", description="adapt: PushUp's first strategy")
    adaptive_strategy: bool = Field(True, description="adapt: escalate the strategy while the loss plateaus")
    rounding: Literal["stochastic", "nearest"] = Field("stochastic", description="adapt: rounding of the "
                                                       "training forward (evaluation always rounds to nearest)")
    activations: Optional[Literal["fixed", "int8", "float"]] = Field(
        None, description="adapt: each layer's inputs in its own fixed-point format (fixed: the paper's), int8 "
        "(calibrated as the int8 export does) for layers at <= 8 bits (deploy), or float")
    normalize_gradients: bool = Field(False, description="adapt: train on unit-norm gradients per tensor (the "
                                      "paper's optimizer; needs its own lr). The rules always use unit gradients")
    l1: float = Field(1e-8, ge=0, description="adapt: L1 weight added to the gradients (the paper's 1e-8)")

    @field_validator("tolerance")
    @classmethod
    def _tolerance(cls, value):
        if value is None or value == "sampling" or (isinstance(value, (int, float)) and value >= 0):
            return value
        raise ValueError(f"tolerance={value!r} is not a KL divergence; use a number >= 0 (nats) or 'sampling'")

    @model_validator(mode="after")
    def _fill_mode(self) -> "AdaptQuantConfig":
        for name, value in ADAPT_MODES[self.mode].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits={self.min_bits} is above max_bits={self.max_bits}; lower min_bits or "
                             f"raise max_bits")
        if self.buffer_bits >= self.max_bits:
            raise ValueError(f"buffer_bits={self.buffer_bits} leaves no fractional bits in a {self.max_bits}-bit "
                             f"word; use buffer_bits < max_bits")
        if self.min_lookback > self.max_lookback:
            raise ValueError(f"min_lookback={self.min_lookback} is above max_lookback={self.max_lookback}")
        if self.min_resolution > self.max_resolution:
            raise ValueError(f"min_resolution={self.min_resolution} is above max_resolution={self.max_resolution}")
        return self


QuantizeConfig = Annotated[Union[TernaryQuantConfig, AdaptQuantConfig], Field(discriminator="method")]
