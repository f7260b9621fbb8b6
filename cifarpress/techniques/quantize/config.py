"""The `quantize` stage's knobs, defined once (torch-free); `method` chooses the quantizer.

TernaryQAT.from_config takes a TernaryQuantConfig as it is."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


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


# One method today; AdaPT joins as a second branch: Annotated[Union[...], Field(discriminator="method")].
QuantizeConfig = TernaryQuantConfig
