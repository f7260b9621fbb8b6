"""The technique descriptor the catalogue (cifarpress.techniques) is made of. Torch-free.

A descriptor says everything the pipeline, the model file and the CLI need to know about a technique,
so none of them names one: its recipe key, its one config (a pydantic model, or a discriminated union
of them on `method`), whether it is a stage of its own or an add-on any training stage may carry, its
phase in the pass (which fixes the plug-in order), what it conflicts with, and how a loaded model
replays it. Code that needs torch is named by "module:function" and imported only when used, so
validating a recipe or printing `--help` never imports torch.
"""
from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from cifarpress.train.phases import Phase


@dataclass(frozen=True)
class StageContext:
    """What a plug-in builder may know about the stage it serves. The pipeline fills it in; `load_model`
    is injected because techniques sit below the model-file layer (model_file.load_model)."""

    num_classes: int
    entering_model: str  # the model file entering the stage (the default distillation teacher)
    load_model: Callable[[str], tuple]  # path or builtin:NAME -> (model, info)


def load_function(dotted: str) -> Callable:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Technique:
    name: str  # recipe key: a stage (`- prune: {...}`) or an add-on inside a training stage (`distill: {...}`)
    kind: Literal["stage", "addon"]
    phase: Phase
    config: Any  # the ONE definition of its knobs: a pydantic model or an Annotated union of them on `method`
    plugin: str  # "module:function", function(config, StageContext) -> Plugin or None (off)
    summary: str
    default: Any = None  # an add-on's value when a stage leaves it out (None or False: off)
    record: str | None = None  # "module:function", function(model) -> dict or None: per-layer state to replay
    restore: str | None = None  # "module:function", function(model, record) rebuilds the layers before weights load
    excludes: frozenset[str] = field(default_factory=frozenset)  # techniques it cannot share a stage with
    training_defaults: dict = field(default_factory=dict)  # a stage's own training defaults (prune: 10 epochs)

    def build(self, config, context: StageContext):
        return load_function(self.plugin)(config, context)

    def methods(self) -> tuple:
        """The config classes a `method` key chooses between (one for a plain config)."""
        config = typing.get_origin(self.config) is typing.Annotated and typing.get_args(self.config)[0] \
            or self.config  # Annotated[Union[...], Field(discriminator=...)] -> the Union
        return typing.get_args(config) if typing.get_origin(config) is typing.Union else (config,)
