"""AdaPT as a Trainer plug-in: every conv and linear layer in its own fixed-point format, moved while training.

The rules are in adapt_rules.py, the fixed-point layer in fake_quant.py. This module wires them in:
setup swaps the float model's layers (all of them: AdaPT has no kept layers) and starts each at its
widest word with the finest step that does not clip, pushed down at once; between backward and the
optimizer step (before_optimizer_step) it adds each layer's unit gradient to its window, adapts the
window and the histogram resolution, and when a window is full runs PushDown on the fp32 latent weights
and PushUp on the window's gradient diversity. WL and FL live in the layers' buffers, so checkpoints,
resume, the EMA copy and the model file carry them; the windows live in this plug-in's state.

Deviations from the paper, each a choice: the optimizer stays the stage's SGD on plain gradients unless
`normalize_gradients` (the paper trains on unit-norm gradients, a different step size; the rules use unit
gradients either way); the strategy follows the loss per window rather than per step (one step's loss is
too noisy to call a plateau); the first PushDown runs at setup, so fine-tuning starts from the narrowest
lossless format instead of 32 bits; `settle_fraction` turns PushUp off for the last steps (deploy mode), as
each window's PushUp otherwise leaves every layer a few bits above its lossless format.

bit_weighted_macs is the analytic cost the paper reports: sum of MACs x weight bits x input bits over
fp32's MACs x 32 x 32 (inputs count their word length in fixed point, 8 bits in int8, else 32).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.profile import profile_model
from cifarpress.techniques.quantize import adapt_rules as rules
from cifarpress.techniques.quantize.fake_quant import FakeQuantLayer
from cifarpress.techniques.quantize.ternary import TernaryConfig, quantizable_layers, quantize_model, quantized_layers
from cifarpress.train.phases import Phase
from cifarpress.train.trainer import Plugin, Trainer
from cifarpress.utils.modules import unwrap

FP32_BITS = 32


def layer_macs(model: nn.Module, input_shape=(3, 32, 32)) -> dict[str, int]:
    """MACs per image of each conv/linear layer, by name."""
    return {layer.name: layer.macs for layer in profile_model(model, (1, *input_shape)).layers}


def bit_weighted_macs(model: nn.Module, macs: dict[str, int]) -> dict:
    """The model's bit-weighted MACs against fp32 (ratio), its MAC-weighted weight bits, and the share of
    MACs in layers of at most 8 bits."""
    layers = quantized_layers(model)
    total = cost = bits = narrow = 0.0
    for name, count in macs.items():
        layer = layers.get(name)
        weight_bits = layer.bits if layer is not None else FP32_BITS
        input_bits = layer.input_bits if layer is not None else FP32_BITS
        total += count
        cost += count * weight_bits * input_bits
        bits += count * weight_bits
        narrow += count * (weight_bits <= 8)
    if not total:
        return {"bops_ratio": None, "mean_weight_bits": None, "int8_macs_fraction": None}
    return {"bops_ratio": cost / (total * FP32_BITS * FP32_BITS), "mean_weight_bits": bits / total,
            "int8_macs_fraction": narrow / total}


class AdaptQAT(Plugin):
    name = "adapt-qat"
    phase = Phase.QUANTIZE
    shown_metrics = ("adapt_bops", "adapt_mean_bits")

    def __init__(self, config):
        self.config = config
        self.layers: dict[str, FakeQuantLayer] = {}
        self.windows: dict[str, dict] = {}
        self.macs: dict[str, int] = {}
        self.strategy = config.strategy
        self.losses: list[float] = []  # recent step losses, for the strategy
        self.trajectory: list[list] = []  # [step, layer, WL, FL] at setup and at every switch
        self.seed = 0
        self.generator: torch.Generator | None = None

    # -- setup --------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        c = self.config
        model = unwrap(trainer.model)
        if quantized_layers(model):
            raise CifarpressError("AdaPT needs a float model, but the model entering the stage is already quantized; "
                                  "start from the float model or drop the earlier quantize stage")
        self.macs = layer_macs(model, getattr(trainer, "input_shape", None) or (3, 32, 32))
        names = list(quantizable_layers(model))
        quantize_model(model, TernaryConfig(keep=names, act_bits=8 if c.activations == "int8" else None))
        self.layers = quantized_layers(model)
        self.seed = trainer.config.seed
        self.generator = torch.Generator(device=trainer.device)
        for name, layer in self.layers.items():
            word, frac = rules.initial_format(layer.weight, c.max_bits, c.buffer_bits, c.min_bits)
            word, frac = self._push_down(layer, word, frac, c.min_resolution)
            layer.set_fixed_point(word, frac)
            if c.activations == "fixed":
                layer.set_fixed_inputs(True)
            layer.stochastic_rounding = c.rounding == "stochastic"
            layer.rounding_generator = self.generator
            self.windows[name] = {"sum": torch.zeros_like(layer.weight), "count": 0,
                                  "lookback": c.max_lookback, "resolution": c.min_resolution}
            self.trajectory.append([0, name, word, frac])

    # -- per step -----------------------------------------------------------
    def before_step(self, trainer: Trainer, images, labels) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + trainer.step)  # resumed runs draw the same noise

    def loss(self, trainer: Trainer, images, labels, logits):
        if self.config.adaptive_strategy:
            self.losses.append(float(F.cross_entropy(logits.detach().float(), labels)))
            del self.losses[:-2 * self.config.max_lookback]
        return None

    @torch.no_grad()
    def before_optimizer_step(self, trainer: Trainer, optimizer) -> None:
        c = self.config
        for name, layer in self.layers.items():
            grad = layer.weight.grad
            if grad is None:
                continue
            norm = grad.norm()
            positive = float(norm) > 0  # one host read per layer and step
            window = self.windows[name]
            if positive:
                window["sum"].add_(grad / norm)
                window["count"] += 1
            diversity = rules.gradient_diversity(window["sum"], window["count"])
            window["lookback"] = rules.next_lookback(diversity, window["lookback"], c.min_lookback, c.max_lookback,
                                                     c.lookback_momentum)
            window["resolution"] = rules.next_resolution(window["lookback"], window["resolution"], c.min_lookback,
                                                         c.max_lookback, c.min_resolution, c.max_resolution)
            if window["count"] >= window["lookback"]:
                self._switch(trainer, name, layer, window, diversity)
            if c.normalize_gradients and positive:
                grad.div_(norm)
            if c.l1:
                grad.add_(layer.weight.sign(), alpha=c.l1)

    def _push_down(self, layer: FakeQuantLayer, word: int, frac: int, bins: int) -> tuple[int, int]:
        c = self.config
        return rules.push_down(layer.weight.detach(), word, frac, bins=bins, tolerance=c.tolerance,
                               floored=c.sampling_floor, min_bits=c.min_bits, max_bits=c.max_bits,
                               buffer_bits=c.buffer_bits)

    def _switch(self, trainer: Trainer, name: str, layer: FakeQuantLayer, window: dict, diversity: float) -> None:
        c = self.config
        if c.adaptive_strategy:
            self._adapt_strategy(window["lookback"])
        bounds = dict(min_bits=c.min_bits, max_bits=c.max_bits, buffer_bits=c.buffer_bits)
        word, frac = self._push_down(layer, layer.bits, layer.frac_bits, window["resolution"])
        settling = trainer.step >= (1.0 - c.settle_fraction) * trainer.total_steps
        if not settling:
            word, frac = rules.push_up(word, frac, diversity, self.strategy, **bounds)
            frac = rules.within_range(float(layer.weight.detach().abs().max()), word, frac)
        if (word, frac) != (layer.bits, layer.frac_bits):
            layer.set_fixed_point(word, frac)
            self.trajectory.append([trainer.step + 1, name, word, frac])
        window["sum"].zero_()
        window["count"] = 0

    def _adapt_strategy(self, lookback: int) -> None:
        if len(self.losses) < 2 * lookback:
            return
        means = torch.tensor([sum(self.losses[-lookback:]), sum(self.losses[-2 * lookback:-lookback])],
                             dtype=torch.float64) / lookback
        if dist.is_initialized():  # every rank must take the same decision: the formats stay in step
            dist.all_reduce(means)
        self.strategy = rules.next_strategy(self.strategy, float(means[0]), float(means[1]))

    # -- reporting and state ------------------------------------------------
    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        cost = bit_weighted_macs(unwrap(trainer.model), self.macs)
        metrics["adapt_bops"] = cost["bops_ratio"]
        metrics["adapt_mean_bits"] = cost["mean_weight_bits"]
        metrics["adapt_int8_macs"] = cost["int8_macs_fraction"]
        metrics["adapt_formats"] = {name: [layer.bits, layer.frac_bits] for name, layer in self.layers.items()}

    def state_dict(self) -> dict:
        return {"windows": self.windows, "strategy": self.strategy, "losses": self.losses,
                "trajectory": self.trajectory}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        for name, saved in state["windows"].items():
            if name in self.windows:
                self.windows[name].update(saved)
                self.windows[name]["sum"] = saved["sum"].to(self.windows[name]["sum"].device)
        self.strategy, self.losses, self.trajectory = state["strategy"], list(state["losses"]), state["trajectory"]


def build(config, context=None) -> AdaptQAT:
    """The catalogue's `quantize: {method: adapt}` stage."""
    return AdaptQAT(config)


__all__ = ["AdaptQAT", "bit_weighted_macs", "build", "layer_macs"]
