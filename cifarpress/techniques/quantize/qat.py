"""Ternary quantization-aware training as a Trainer plug-in (the numerics and layers are in ternary.py)."""
from __future__ import annotations

from torch import nn

from cifarpress.techniques.quantize.ternary import (
    TernaryConfig,
    quantize_model,
    quantized_layers,
    set_warmup_blend,
)
from cifarpress.train.phases import Phase
from cifarpress.train.trainer import Plugin, Trainer
from cifarpress.utils.modules import unwrap

# -- the trainer plug-in ---------------------------------------------------------------

class TernaryQAT(Plugin):
    """Quantization-aware training: swaps the layers in setup, before the Trainer builds its optimizer.

    Its phase (QUANTIZE) puts it before WeightEMA, so that the EMA copies the
    quantized model. finalize() hands on the fake-quant model unchanged: save it
    with save_packed and export it with export_qdq.
    """

    name = "ternary-qat"
    phase = Phase.QUANTIZE

    def __init__(self, config: TernaryConfig | None = None):
        self.config = config or TernaryConfig()
        self.steps = 0  # optimizer steps taken, which drives the warm-up
        self.precisions: dict[str, str] = {}
        self._model: nn.Module | None = None

    def blend(self) -> float:
        if self.config.warmup_steps == 0:
            return 1.0
        return min(1.0, self.steps / self.config.warmup_steps)

    def setup(self, trainer: Trainer) -> None:
        self._model = unwrap(trainer.model)
        existing = quantized_layers(self._model)
        if existing:  # fine-tuning an already quantized model: keep its layers
            self.precisions = {n: m.precision for n, m in existing.items()}
        else:
            self.precisions = quantize_model(self._model, self.config)
        set_warmup_blend(self._model, self.blend())

    def after_step(self, trainer: Trainer) -> None:
        self.steps += 1
        if self.steps <= self.config.warmup_steps:
            set_warmup_blend(self._model, self.blend())

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if self.config.warmup_steps:
            metrics["ternary_blend"] = self.blend()

    def finalize(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        set_warmup_blend(model, 1.0)  # the hand-on is the deployable model even if warm-up outlasted training
        return model

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))
        if self._model is not None:
            set_warmup_blend(self._model, self.blend())


def build(config, context=None) -> Plugin:
    """The catalogue's `quantize` stage: `method: ternary` here, `method: adapt` in adapt.py."""
    if config.method == "adapt":
        from cifarpress.techniques.quantize.adapt import build as build_adapt

        return build_adapt(config, context)
    return TernaryQAT(TernaryConfig.from_dict(config.model_dump(exclude={"method"})))
