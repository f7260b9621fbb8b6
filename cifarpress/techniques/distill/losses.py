"""Distillation losses on logits, plus a FitNets feature hint.

Every logit loss takes (student, teacher) logits of shape (N, C), treats the
teacher as a constant (it is detached here, so a caller cannot leak gradient
into it) and returns a scalar averaged over the batch. Defaults are the ones
the papers (or their official code) publish for CIFAR-100.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifarpress.errors import CifarpressError


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    KL(softmax(teacher/T) || softmax(student/T)) * T^2, summed over classes and
    averaged over the batch. The T^2 keeps the gradient scale independent of T
    (paper, section 2). T=4 is the CIFAR-100 setting of CRD and DKD's code base
    (mdistiller), which mix 0.1 x CE + 0.9 x KD.
    """
    log_p_student = F.log_softmax(student / T, dim=1)
    log_p_teacher = F.log_softmax(teacher.detach() / T, dim=1)
    # log_target: no 0*log(0) when a teacher probability underflows.
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * T**2


def _split_target(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logit (N,), non-target logits (N, C-1)), the target column dropped.

    Dropping the column is the exact form of DKD's "subtract 1000 from the
    target logit before the softmax": the softmax over the rest is each
    non-target probability renormalized to sum to 1.
    """
    n, c = logits.shape
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels.view(-1, 1), False)
    return logits.gather(1, labels.view(-1, 1)).squeeze(1), logits[keep].view(n, c - 1)


def _binary_log_probs(logits: torch.Tensor, labels: torch.Tensor, T: float) -> torch.Tensor:
    """log [p_target, 1 - p_target] at temperature T, shape (N, 2), without log(1 - p) cancelling."""
    target, rest = _split_target(logits / T, labels)
    log_total = torch.logsumexp(logits / T, dim=1)
    return torch.stack([target - log_total, torch.logsumexp(rest, dim=1) - log_total], dim=1)


def dkd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, T: float = 4.0) -> torch.Tensor:
    """Decoupled KD: Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation".

    alpha * TCKD + beta * NCKD, each a KL divergence times T^2, batch mean:
      TCKD: KL between the binary (target, non-target) probabilities of teacher and student;
      NCKD: KL between the distributions over the non-target classes, each renormalized.
    KD itself equals TCKD + (1 - p_target_teacher) * NCKD (the paper's reformulation); DKD frees
    NCKD from that weight. Published CIFAR-100 defaults: alpha=1, beta=8, T=4, CE
    weight 1, and a linear warm-up of the whole term over the first 20 of 240
    epochs (done by the Distillation plug-in, not here).
    """
    teacher = teacher.detach()
    tckd = F.kl_div(_binary_log_probs(student, labels, T), _binary_log_probs(teacher, labels, T),
                    reduction="batchmean", log_target=True)
    _, student_rest = _split_target(student, labels)
    _, teacher_rest = _split_target(teacher, labels)
    nckd = F.kl_div(F.log_softmax(student_rest / T, dim=1), F.log_softmax(teacher_rest / T, dim=1),
                    reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * T**2


def nkd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
             T: float = 1.0, gamma: float = 1.5) -> torch.Tensor:
    """Normalized KD: Yang et al., ICCV 2023, "From Knowledge
    Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized
    Loss and Customized Soft Labels".

    L_NKD = -t_y * log s_y  -  gamma * T^2 * sum_{i != y} N(t_i^T) * log N(s_i^T), batch mean,
    where t, s are teacher/student softmax probabilities (the target term always at
    T=1), y the label, and N(.) renormalizes the non-target probabilities at
    temperature T to sum to 1. Both terms are cross-entropies, as in the paper and
    the official code (yzd-v/cls_KD): the non-target term is KL plus the teacher's
    entropy, so it is not zero when student == teacher; the gradient is the KL's.
    It is used alongside the usual CE on the labels. Defaults T=1, gamma=1.5 are
    those of the official implementation.
    """
    teacher = teacher.detach()
    labels_col = labels.view(-1, 1)
    teacher_target_p = F.softmax(teacher, dim=1).gather(1, labels_col).squeeze(1)
    student_target_logp = F.log_softmax(student, dim=1).gather(1, labels_col).squeeze(1)
    target_term = -(teacher_target_p * student_target_logp).mean()
    _, student_rest = _split_target(student, labels)
    _, teacher_rest = _split_target(teacher, labels)
    cross_entropy = -(F.softmax(teacher_rest / T, dim=1) * F.log_softmax(student_rest / T, dim=1)).sum(1).mean()
    return target_term + gamma * T**2 * cross_entropy


# -- feature hints (same-family pairs, e.g. resnet56 -> resnet20) ------------------------

def hint_projector(student_channels: int, teacher_channels: int) -> nn.Module:
    """FitNets regressor: a 1x1 conv from the student's width to the teacher's (identity when equal).

    It has weights, so whoever uses it must train it: add its parameters to the optimizer.
    """
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                 projector: nn.Module | None = None) -> torch.Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015): MSE(projector(student_feat), teacher_feat).

    Maps must share their spatial size (true for same-family CIFAR nets at the same stage).
    """
    if projector is not None:
        student_feat = projector(student_feat)
    if student_feat.shape != teacher_feat.shape:
        raise CifarpressError(
            f"feature hint shapes differ: student {tuple(student_feat.shape)}, teacher {tuple(teacher_feat.shape)}; "
            f"pick layers at the same stage, and a projector when the channel counts differ")
    return F.mse_loss(student_feat.float(), teacher_feat.detach().float())


class OutputHook:
    """Keeps the latest output of the submodule `name` of `model`.

        with OutputHook(teacher, "layer3") as hook:
            teacher(images)
        hook.output
    """

    def __init__(self, model: nn.Module, name: str):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CifarpressError(f"the model has no layer '{name}'; see model.named_modules() for the names") from None
        self.output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.output = output

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "OutputHook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
