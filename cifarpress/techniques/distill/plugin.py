"""Knowledge distillation as a Trainer plug-in, so it composes with pruning, QAT and EMA.

The teacher sees the very batch the student sees (same crop and flip), frozen
and in eval mode; the plug-in adds `weight * ramp * distill_loss` to the
Trainer's cross-entropy, whose weight is 1.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.techniques.distill.losses import dkd_loss, kd_loss, nkd_loss
from cifarpress.train.phases import Phase
from cifarpress.train.trainer import Plugin, Trainer

# Per method: temperature, weight of the distillation term, share of the run spent
# ramping that weight up from 0. DKD warms up over 20 of its 240 epochs; keeping
# that share (1/12) rather than 20 epochs lets a 30-epoch fine-tune warm up for 2.5.
METHOD_DEFAULTS = {
    "kd": {"T": 4.0, "weight": 0.9, "label_weight": 0.1, "warmup_share": 0.0},
    "dkd": {"T": 4.0, "weight": 1.0, "label_weight": 1.0, "warmup_share": 20 / 240},
    "nkd": {"T": 1.0, "weight": 1.0, "label_weight": 1.0, "warmup_share": 0.0},
}
DKD_MAX_WARMUP_EPOCHS = 20.0


def check_class_counts(teacher_outputs: int, student_outputs: int, teacher_name: str = "") -> None:
    if teacher_outputs != student_outputs:
        source = f" ({teacher_name})" if teacher_name else ""
        raise CifarpressError(
            f"teacher has {teacher_outputs} outputs, student {student_outputs}{source}; "
            f"distil from a teacher trained on the student's dataset")


def linear_ramp(step: int, warmup_steps: int) -> float:
    """Weight multiplier at optimizer step `step` (0-based): rises linearly to 1 over `warmup_steps`."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


class _Stopwatch:
    """Seconds spent inside `with stopwatch:`; on CUDA it uses events, so timing adds no host sync per step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._host_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __enter__(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._host_s += time.perf_counter() - self._t0

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
        return self._host_s + sum(start.elapsed_time(end) for start, end in self._events) / 1000.0


class Distillation(Plugin):
    """Adds a distillation loss from a frozen teacher to the student's training.

    method: "kd" (Hinton), "dkd" (decoupled KD; alpha, beta) or "nkd" (normalized KD; gamma).
    weight: multiplier of the distillation term, label_weight: multiplier of the
    Trainer's cross-entropy on the labels (defaults per method, see METHOD_DEFAULTS).
    T: temperature (default per method). warmup_epochs: linear ramp of the term
    (default: DKD's 20-of-240-epoch share of the run, capped at 20; 0 for kd/nkd).

    Vanilla KD trains on 0.1 x CE + 0.9 x KD, as published; DKD and NKD keep CE at 1.
    """

    name = "distill"
    phase = Phase.LOSS
    shown_metrics = ("teacher_time_fraction",)

    def __init__(self, teacher: nn.Module, method: str = "kd", weight: float | None = None, T: float | None = None,
                 alpha: float = 1.0, beta: float = 8.0, gamma: float = 1.5, warmup_epochs: float | None = None,
                 label_weight: float | None = None):
        if method not in METHOD_DEFAULTS:
            raise ValueError(f"unknown distillation method '{method}'; choose one of {', '.join(METHOD_DEFAULTS)}")
        defaults = METHOD_DEFAULTS[method]
        self.teacher = teacher
        self.method = method
        self.weight = defaults["weight"] if weight is None else weight
        self.T = defaults["T"] if T is None else T
        self.label_weight = defaults["label_weight"] if label_weight is None else label_weight
        if self.weight < 0 or self.T <= 0 or self.label_weight < 0:
            raise ValueError(f"distillation weight must be >= 0 and T > 0, got weight {self.weight}, T {self.T}")
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = 0
        self._stopwatch = _Stopwatch(torch.device("cpu"))

    def setup(self, trainer: Trainer) -> None:
        teacher = self.teacher.to(trainer.device).eval()
        if trainer.config.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        epochs = self.warmup_epochs
        if epochs is None:
            epochs = min(DKD_MAX_WARMUP_EPOCHS, METHOD_DEFAULTS[self.method]["warmup_share"] * trainer.config.epochs)
        self.warmup_steps = round(epochs * trainer.steps_per_epoch)
        self._stopwatch = _Stopwatch(trainer.device)

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.method == "kd":
            return kd_loss(student, teacher, self.T)
        if self.method == "dkd":
            return dkd_loss(student, teacher, labels, self.alpha, self.beta, self.T)
        return nkd_loss(student, teacher, labels, self.T, self.gamma)

    def loss(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor,
             logits: torch.Tensor) -> torch.Tensor:
        with self._stopwatch, torch.no_grad():
            teacher_logits = self.teacher(images)
        check_class_counts(teacher_logits.shape[1], logits.shape[1])
        # float32: softmax of fp16 logits at T=4 loses the small probabilities KD is about.
        loss = self.distill_loss(logits.float(), teacher_logits.float(), labels)
        return self.weight * linear_ramp(trainer.step, self.warmup_steps) * loss

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        teacher_s = self._stopwatch.seconds()
        self._stopwatch.reset()
        fraction = min(1.0, teacher_s / metrics["epoch_s"]) if metrics["epoch_s"] > 0 else 0.0
        metrics["teacher_s"] = teacher_s
        metrics["teacher_time_fraction"] = fraction
        # What the student alone would train at: the teacher's share of the epoch removed.
        metrics["images_per_s_without_teacher"] = metrics["images_per_s"] / max(1e-9, 1.0 - fraction)


def teacher_from(spec: str, num_classes: int, load_model) -> nn.Module:
    """The teacher a model file path or `builtin:NAME` holds, checked against the student's class count, in eval
    mode. `load_model` is model_file.load_model, passed in because techniques sit below the model-file layer."""
    model, info = load_model(spec)  # a missing file or unknown builtin is already a CifarpressError
    check_class_counts(info["num_classes"], num_classes, spec)
    return model.eval()


def build(config, context) -> Distillation | None:
    """The catalogue's `distill:` add-on: the teacher named by the config, else the model entering the stage."""
    if config is None:
        return None
    teacher = teacher_from(config.teacher or str(context.entering_model), context.num_classes, context.load_model)
    return Distillation(teacher, config.method, weight=config.weight, T=config.temperature,
                        alpha=config.alpha, beta=config.beta, gamma=config.gamma,
                        warmup_epochs=config.warmup_epochs, label_weight=config.label_weight)
