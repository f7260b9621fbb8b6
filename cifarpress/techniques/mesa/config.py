"""The `mesa:` add-on's knobs, defined once (torch-free). The plug-in (plugin.build) takes it as it is."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MesaConfig(BaseModel):
    """Store the activations a training stage saves for its backward pass at 8 bits (ReLU's as 1-bit masks)."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(8, description="Bits a saved value is stored in; 8 is the one width supported")
    group_size: int = Field(256, description="Elements sharing one range (min and scale), > 0")
    rounding: Literal["stochastic", "nearest"] = Field(
        "stochastic", description="stochastic: unbiased codes, so errors average out in the weight gradients")
    relu_mask: bool = Field(True, description="ReLU and ReLU6 keep a 1-bit mask of where they pass gradient "
                            "instead of their output")
    release_memory: bool = Field(
        False, description="CPU, glibc: freed activation buffers go back to the OS at once, so the training "
        "process's resident memory follows what is live (the saving then shows in RSS and in the batch that fits a "
        "memory cap) at the cost of page faults: 2.5x the step time of plain training on ResNet-56, 2-core CPU "
        "(bench/mesa.py). Off, glibc keeps freed holes resident and the peak RSS stays near plain training's")
    min_elements: int = Field(4096, ge=0, description="Saved tensors smaller than this stay as they are "
                              "(BatchNorm statistics, biases: not worth a range)")

    @field_validator("bits")
    @classmethod
    def eight_bits(cls, value: int) -> int:
        if value != 8:
            raise ValueError(f"bits {value} is not supported; Mesa stores saved activations at bits: 8")
        return value

    @field_validator("group_size")
    @classmethod
    def positive_group(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"group_size {value} must be a positive number of elements (256 is the default)")
        return value
