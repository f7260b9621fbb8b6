"""THE TECHNIQUE CATALOGUE: every compression technique, described once (see base.Technique).

Recipes validate against it (pipeline/recipe.py builds each stage's schema from it), the pipeline
builds plug-ins through it in phase order (pipeline/compress.py), and model files record and replay
what was applied through it (model_file.py). None of them names a technique.

Adding a technique (nothing else is touched):
1. techniques/<name>/config.py: a torch-free pydantic config, or a new branch of a stage's `method`
   union (e.g. `quantize: {method: adapt}` joins QuantizeConfig).
2. techniques/<name>/plugin.py (+ its algorithm files): a train.Plugin using only the documented hooks,
   with its `phase`, and a `build(config, context)` that takes the config as it is.
3. One line below: the descriptor (kind, phase, excludes, record/restore for anything a loaded model
   must rebuild).
4. recipes/<name>.yaml and tests/techniques/test_<name>.py; tests/test_technique_contract.py then
   covers it (composes with EMA and KD, resumes exactly, saves and loads, exports with parity).
A new Trainer hook or a new layer kind in export/qdq.py is a reviewed change of its own.
"""
from __future__ import annotations

from typing import Optional

from cifarpress.techniques.base import StageContext, Technique
from cifarpress.techniques.distill.config import DistillConfig
from cifarpress.techniques.mesa.config import MesaConfig
from cifarpress.techniques.prune.config import PruneConfig
from cifarpress.techniques.quantize.config import QuantizeConfig
from cifarpress.train.phases import Phase

CATALOGUE: tuple[Technique, ...] = (
    Technique("prune", "stage", Phase.RESHAPE, PruneConfig, "cifarpress.techniques.prune.plugin:build",
              "Structured pruning of zero-invariant channel groups, cut out physically: OTO-style group sparsity "
              "(hesso, dhspg) or learned consensus gates (gating)",
              training_defaults={"epochs": 10}),
    Technique("quantize", "stage", Phase.QUANTIZE, QuantizeConfig, "cifarpress.techniques.quantize.qat:build",
              "Quantization-aware training: ternary (BitNet b1.58 weights {-1, 0, +1} x scale) or adapt (AdaPT: "
              "per-layer fixed-point precision moved during training by an information-loss rule)",
              record="cifarpress.techniques.quantize.record:record",
              restore="cifarpress.techniques.quantize.record:restore", training_defaults={"epochs": 5}),
    Technique("distill", "addon", Phase.LOSS, Optional[DistillConfig], "cifarpress.techniques.distill.plugin:build",
              "Knowledge distillation from a teacher (kd, dkd, nkd) as a loss term"),
    Technique("ema", "addon", Phase.AVERAGE, bool, "cifarpress.train.ema:build",
              "Evaluate and keep an exponential moving average of the weights", default=False),
    Technique("mesa", "addon", Phase.MEMORY, Optional[MesaConfig], "cifarpress.techniques.mesa.plugin:build",
              "Mesa: keep 8-bit copies of the activations saved for backward (ReLU: 1-bit masks) to cut "
              "training memory"),
)

TECHNIQUES: dict[str, Technique] = {t.name: t for t in CATALOGUE}


def stage_techniques() -> list[Technique]:
    return [t for t in CATALOGUE if t.kind == "stage"]


def addon_techniques() -> list[Technique]:
    return [t for t in CATALOGUE if t.kind == "addon"]


__all__ = ["CATALOGUE", "TECHNIQUES", "StageContext", "Technique", "addon_techniques", "stage_techniques"]
