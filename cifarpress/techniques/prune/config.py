"""The `prune` stage's knobs, defined once (torch-free): a discriminated union on `method`.

The plug-ins (HessoPruner.from_config, DhspgPruner.from_config) take these objects as they are."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

# (start_fraction, end_fraction) of the pruning window when a prune stage leaves them out. HESSO's
# was measured: ResNet-20 at 50% MACs, 10 epochs, fisher saliency, 0.05-0.3 gave 85.89% against
# 84.56% for magnitude-taylor over 0.1-0.5 (bench/results/prune_vs_torch_pruning-resnet20.json).
# Gating's gates train from the first step (from a trained model they start open) and freeze at half
# the run, leaving the other half to fine-tune the static sub-network.
PRUNE_WINDOW = {"hesso": (0.05, 0.3), "dhspg": (0.1, 0.8), "gating": (0.0, 0.5)}


def _window_defaults(end: int) -> str:
    return ", ".join(f"{window[end]:g} for {method}" for method, window in PRUNE_WINDOW.items())


class PruneTargetOptions(BaseModel):
    """What every pruning method shares: the target, how widths round, the pruning window."""

    model_config = ConfigDict(extra="forbid")

    sparsity: Optional[float] = Field(None, gt=0, lt=1, description="Fraction of prunable groups to remove")
    macs: Optional[float] = Field(None, gt=0, lt=1, description="Fraction of MACs to keep")
    channel_multiple: int = Field(8, ge=1, description="Kept widths rounded to a multiple of this; match the "
                                  "target's kernel block (16 for onnxruntime on AVX-512 CPUs, see "
                                  "bench/width_rounding.py)")
    remove_branches: bool = Field(False, description="Let a residual branch's inner width go to zero, so the "
                                  "block becomes its shortcut plus a constant: whole convs removed, faster per MAC "
                                  "saved than narrow widths on CPUs")
    selection: Literal["score", "score-per-mac", "uniform"] = Field(
        "score-per-mac", description="macs target: cut the lowest score per MAC saved, the lowest-scoring groups "
        "(score), or every unit by a common fraction topped up per MAC (uniform)")
    start_fraction: Optional[float] = Field(None, ge=0, lt=1, description="Share of steps trained before pruning "
                                            "starts (default " + _window_defaults(0) + ")")
    end_fraction: Optional[float] = Field(None, gt=0, le=1, description="Share of steps by which groups are zero "
                                          "(default " + _window_defaults(1) + ")")

    @model_validator(mode="after")
    def one_target(self):
        if (self.sparsity is None) == (self.macs is None):
            raise ValueError("give exactly one target: sparsity (fraction of groups removed) "
                             "or macs (fraction of MACs kept), each in (0, 1)")
        return self

    def window(self) -> dict:
        """start_fraction and end_fraction, the method's defaults where the config leaves them out."""
        default_start, default_end = PRUNE_WINDOW[self.method]  # type: ignore[attr-defined]
        return {"start_fraction": default_start if self.start_fraction is None else self.start_fraction,
                "end_fraction": self.end_fraction or default_end}


class HessoConfig(PruneTargetOptions):
    """HESSO: hybrid efficient structured sparse optimizer (OTOv3), saliency-ranked groups projected to zero."""

    method: Literal["hesso"] = "hesso"
    pruning_periods: int = Field(5, ge=1, description="HESSO: periods over which the target is reached")
    saliency: Literal["magnitude-taylor", "fisher"] = Field(
        "fisher", description="HESSO: group importance from the current step's magnitude and Taylor "
        "terms, or from squared Taylor terms averaged over each period (fisher)")


class DhspgConfig(PruneTargetOptions):
    """DHSPG: dual half-space projected gradient (OTOv2), a group-lasso penalty with half-space projection."""

    method: Literal["dhspg"] = "dhspg"
    penalty: float = Field(0.1, gt=0, description="DHSPG: group-lasso strength (lambda), > 0")
    epsilon: float = Field(0.0, ge=0, description="DHSPG: half-space projection threshold")


class GatingConfig(PruneTargetOptions):
    """Consensus gating: a learned 0/1 gate per channel_multiple step of each width (and per removable residual
    branch) with a polarization and a MACs budget loss, frozen into a static mask that meets the target exactly,
    then cut (one pass)."""

    method: Literal["gating"] = "gating"
    selection: Literal["score"] = Field("score", description="gating: the final cut takes the gates with the "
                                        "lowest keep probability first (the only order gating uses)")
    gates: Literal["static", "dynamic"] = Field(
        "static", description="gating: one learnable logit per gate (static), or per-sample heads pushed to a "
        "consensus by the batch variance of each gate, frozen into the static mask (dynamic)")
    form: Literal["hard", "annealed"] = Field(
        "hard", description="gating: 0/1 forward with a straight-through gradient (hard), or ChipNet's continuous "
        "Heaviside sharpened over the window (annealed)")
    polarization: Literal["zhuang", "bimodal"] = Field(
        "zhuang", description="gating: t*mean(p) - mean|p - mean p| (Zhuang et al. 2020) or 4*mean p(1-p)")
    polarization_weight: float = Field(1.0, ge=0, description="gating: weight of the polarization loss, >= 0")
    polarization_t: float = Field(1.4, ge=0, description="gating: zhuang's t (1.4 for ResNet-56 in the paper)")
    budget_weight: float = Field(30.0, ge=0, description="gating: weight of (kept ratio - target)^2, >= 0")
    consensus_weight: float = Field(1.0, ge=0, description="gating, dynamic: weight of the gates' batch variance")
    gate_lr: float = Field(0.01, gt=0, description="gating: the gates' learning rate (their gradients have unit "
                           "RMS; the run's schedule scales it)")


PruneConfig = Annotated[Union[HessoConfig, DhspgConfig, GatingConfig], Field(discriminator="method")]
