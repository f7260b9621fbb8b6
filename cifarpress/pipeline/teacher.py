"""The distillation teacher a stage names: a model file or `builtin:NAME`, checked against the class count."""
from __future__ import annotations

from torch import nn

from cifarpress.model_file import load_model
from cifarpress.techniques.distill.plugin import teacher_from


def load_teacher(spec: str, num_classes: int) -> nn.Module:
    """The teacher named by a cifarpress model file path or `builtin:NAME`, checked against the class count."""
    return teacher_from(spec, num_classes, load_model)
