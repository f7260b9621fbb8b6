"""The distillation teacher a stage names: a model file or `builtin:NAME`, checked against the class count."""
from __future__ import annotations

from torch import nn

from cifarpress.model_file import load_model
from cifarpress.techniques.distill.plugin import check_class_counts


def load_teacher(spec: str, num_classes: int) -> nn.Module:
    """The teacher named by a cifarpress model file path or `builtin:NAME`, checked against the class count."""
    model, info = load_model(spec)  # a missing file or unknown builtin is already a CifarpressError
    check_class_counts(info["num_classes"], num_classes, spec)
    return model.eval()
