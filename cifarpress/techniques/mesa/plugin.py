"""Mesa as a training add-on: `mesa: {bits: 8, group_size: 256, rounding: stochastic, relu_mask: true}`.

Mesa (Pan et al., arXiv 2111.11124; ziplab/Mesa) runs the forward pass on exact activations and keeps
only an 8-bit copy of each tensor saved for backward, dequantized when backward reads it, with ReLU
keeping a sign mask. The original covers Transformer layers through CUDA extensions for torch 1.x;
this one works on any model through autograd's saved-tensor hooks (saved.py, packing.py), on the CPU
as on a GPU. The weights, the optimizer and the forward are untouched, so the technique changes only
the gradients, by the rounding of the saved activations (tests/test_mesa.py bounds it).

The plug-in's phase is MEMORY, the last one: its context wraps the forward of everything before it
(the quantizer's fake-quant ops, the distillation teacher, which runs under no_grad and saves nothing).
Stochastic rounding draws from a generator of its own, seeded from the step, so a resumed run
rounds as the uninterrupted one did and the global RNG is left alone.

Per epoch it records `saved_bytes`: the most bytes held for backward by one step (summed in the pack
hook), the figure bench/mesa.py compares against plain training measured the same way.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from cifarpress.techniques.mesa.config import MesaConfig
from cifarpress.techniques.mesa.saved import SavedActivationStore
from cifarpress.train.phases import Phase
from cifarpress.train.trainer import Plugin
from cifarpress.utils.memory import release_freed_buffers
from cifarpress.utils.modules import unwrap


class SavedActivationPlugin(Plugin):
    """Routes each training forward through a SavedActivationStore and records what it held."""

    name = "saved-activations"
    phase = Phase.MEMORY
    shown_metrics = ("saved_mib",)

    def __init__(self, store: SavedActivationStore):
        self.store = store
        self.seed = 0  # the run's, from setup
        self.epoch_peak = 0

    def setup(self, trainer) -> None:
        self.store.watch(unwrap(trainer.model))
        self.store.generator = torch.Generator(device=trainer.device)
        self.seed = trainer.config.seed

    def before_step(self, trainer, images, labels) -> None:
        # One stream per (step, rank): resume-exact, and ranks round independently.
        self.store.generator.manual_seed(((self.seed * 1_000_003 + trainer.step) * 64 + trainer.rank) % 2**63)

    @contextlib.contextmanager
    def measured_step(self):
        """The store's step context; the step's held bytes then feed the epoch's peak."""
        with self.store.step():
            yield
            self.epoch_peak = max(self.epoch_peak, self.store.held_bytes)

    def forward_context(self, trainer):
        return self.measured_step()

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        metrics["saved_bytes"] = self.epoch_peak
        metrics["saved_mib"] = self.epoch_peak / 2**20
        self.epoch_peak = 0


class Mesa(SavedActivationPlugin):
    name = "mesa"

    def __init__(self, store: SavedActivationStore, release_memory: bool = False):
        super().__init__(store)
        self.release_memory = release_memory
        self.released = False

    @classmethod
    def from_config(cls, config: MesaConfig) -> "Mesa":
        return cls(SavedActivationStore(group_size=config.group_size, stochastic=config.rounding == "stochastic",
                                        relu_mask=config.relu_mask, min_elements=config.min_elements),
                   release_memory=config.release_memory)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if self.release_memory and trainer.device.type == "cpu":
            self.released = release_freed_buffers()
            if not self.released:
                warnings.warn("mesa release_memory: this C library is not glibc, so freed buffers stay with the "
                              "allocator; the saved bytes are still cut, the resident peak may not be")


class SavedBytesMeter(SavedActivationPlugin):
    """Plain training, measured as Mesa measures itself: bytes held for backward, nothing compressed."""

    name = "saved-bytes-meter"

    def __init__(self, measured_steps: int = 2):
        super().__init__(SavedActivationStore(compress=False))
        # Plain training's held bytes depend on the model and batch only, so a few steps an epoch measure
        # them; the other steps run with no hook at all, so images/s is plain training's.
        self.measured_steps = measured_steps

    def forward_context(self, trainer):
        return self.measured_step() if trainer.step % trainer.steps_per_epoch < self.measured_steps else None


def build(config: MesaConfig | None, context=None) -> Mesa | None:
    return Mesa.from_config(config) if config is not None else None
