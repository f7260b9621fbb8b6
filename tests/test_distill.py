"""cifarpress.distill: KD/DKD/NKD against loop references, the plug-in in the Trainer, teacher loading."""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

from cifarpress.model_file import save_model
from cifarpress.data import load_split
from cifarpress.techniques.distill.plugin import Distillation
from cifarpress.techniques.distill.losses import OutputHook, dkd_loss, feature_loss, hint_projector, kd_loss, nkd_loss
from cifarpress.pipeline.teacher import load_teacher
from cifarpress.techniques.distill.plugin import linear_ramp
from cifarpress.errors import CifarpressError
from cifarpress.models import build_model
from cifarpress.train.ema import WeightEMA
from cifarpress.train.trainer import TrainConfig, Trainer


# -- references written with plain loops over Python floats ---------------------------------

def softmax(row: list[float], T: float = 1.0) -> list[float]:
    top = max(row)
    e = [math.exp((v - top) / T) for v in row]
    return [v / sum(e) for v in e]


def renormalized_non_target(p: list[float], y: int) -> list[float]:
    """The papers' N(.): non-target probabilities divided by 1 - p_target."""
    return [p[i] / (1.0 - p[y]) for i in range(len(p)) if i != y]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def ref_kd(student, teacher, T):
    return sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(student, teacher)) / len(student) * T * T


def ref_dkd(student, teacher, labels, alpha, beta, T):
    total = 0.0
    for s, t, y in zip(student, teacher, labels):
        ps, pt = softmax(s, T), softmax(t, T)
        tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        nckd = kl(renormalized_non_target(pt, y), renormalized_non_target(ps, y))
        total += alpha * tckd + beta * nckd
    return total / len(student) * T * T


def ref_nkd(student, teacher, labels, T, gamma):
    total = 0.0
    for s, t, y in zip(student, teacher, labels):
        target_term = -softmax(t)[y] * math.log(softmax(s)[y])
        nt, ns = renormalized_non_target(softmax(t, T), y), renormalized_non_target(softmax(s, T), y)
        total += target_term - gamma * T * T * sum(a * math.log(b) for a, b in zip(nt, ns))
    return total / len(student)


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([0, 3, 6, 2, 3])
    return student, teacher, labels


# -- losses ---------------------------------------------------------------------------------

def test_kd_matches_a_value_worked_by_hand():
    # teacher probs (3/4, 1/4), student (1/2, 1/2), T=1: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(student, teacher, T=1.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_loop_reference(logits, T):
    student, teacher, _ = logits
    assert kd_loss(student, teacher, T).item() == pytest.approx(ref_kd(student.tolist(), teacher.tolist(), T),
                                                                rel=1e-10)


def test_kd_is_zero_when_student_equals_teacher(logits):
    student, _, _ = logits
    assert kd_loss(student, student.clone()).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_loop_reference(logits, alpha, beta, T):
    student, teacher, labels = logits
    expected = ref_dkd(student.tolist(), teacher.tolist(), labels.tolist(), alpha, beta, T)
    assert dkd_loss(student, teacher, labels, alpha, beta, T).item() == pytest.approx(expected, rel=1e-10)


def test_dkd_is_zero_when_student_equals_teacher(logits):
    student, _, labels = logits
    assert dkd_loss(student, student.clone(), labels).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_decomposes_into_tckd_plus_weighted_nckd(logits, T):
    # DKD's reformulation, per sample: KD = TCKD + (1 - p_target_teacher) * NCKD
    student, teacher, labels = logits
    for i in range(len(labels)):
        s, t, y = student[i:i + 1], teacher[i:i + 1], labels[i:i + 1]
        tckd = dkd_loss(s, t, y, alpha=1.0, beta=0.0, T=T)
        nckd = dkd_loss(s, t, y, alpha=0.0, beta=1.0, T=T)
        p_target = torch.softmax(t / T, dim=1)[0, y].item()
        assert kd_loss(s, t, T).item() == pytest.approx((tckd + (1 - p_target) * nckd).item(), rel=1e-10)
        assert dkd_loss(s, t, y, 1.0, 1.0, T).item() == pytest.approx((tckd + nckd).item(), rel=1e-10)


@pytest.mark.parametrize("T,gamma", [(1.0, 1.5), (2.0, 0.5)])
def test_nkd_matches_loop_reference(logits, T, gamma):
    student, teacher, labels = logits
    expected = ref_nkd(student.tolist(), teacher.tolist(), labels.tolist(), T, gamma)
    assert nkd_loss(student, teacher, labels, T, gamma).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("loss", [
    lambda s, t, y: kd_loss(s, t), lambda s, t, y: dkd_loss(s, t, y), lambda s, t, y: nkd_loss(s, t, y)])
def test_losses_send_gradient_to_student_only(logits, loss):
    student, teacher, labels = (x.clone() for x in logits)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss(student, teacher, labels).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_extreme_logits_stay_finite():
    student = torch.tensor([[80.0, -80.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-80.0, 80.0, 0.0]])
    labels = torch.tensor([0])
    for value in (kd_loss(student, teacher, 1.0), dkd_loss(student, teacher, labels, T=1.0),
                  nkd_loss(student, teacher, labels)):
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all()


# -- feature hints --------------------------------------------------------------------------

def test_output_hook_and_feature_loss_with_projector():
    torch.manual_seed(0)
    student, teacher = build_model("resnet20", 10).eval(), build_model("resnet20", 10).eval()
    images = torch.randn(2, 3, 32, 32)
    with OutputHook(student, "layer2") as s_hook, OutputHook(teacher, "layer3") as t_hook:
        student(images)
        teacher(images)
    s_feat, t_feat = s_hook.output, t_hook.output
    assert s_feat.shape == (2, 32, 16, 16) and t_feat.shape == (2, 64, 8, 8)
    pooled = nn.functional.avg_pool2d(s_feat, 2)  # same spatial size, channels still differ
    projector = hint_projector(32, 64)
    assert feature_loss(pooled, t_feat, projector).item() == pytest.approx(
        ((projector(pooled) - t_feat) ** 2).mean().item(), rel=1e-6)
    assert isinstance(hint_projector(64, 64), nn.Identity)
    with pytest.raises(CifarpressError, match="shapes differ"):
        feature_loss(pooled, t_feat)
    with pytest.raises(CifarpressError, match="no layer 'layer9'"):
        OutputHook(student, "layer9")


# -- the plug-in ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_cifar_root):
    return (load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False),
            load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False))


def tiny_teacher(num_classes: int = 10, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def quick_config(**overrides) -> TrainConfig:
    base = dict(epochs=1, batch_size=20, lr=0.05, max_steps_per_epoch=3, eval_batch_size=100)
    return TrainConfig(**(base | overrides))


def fake_trainer(epochs=1, steps_per_epoch=1, step=0, channels_last=False):
    return types.SimpleNamespace(device=torch.device("cpu"), step=step, steps_per_epoch=steps_per_epoch,
                                 config=TrainConfig(epochs=epochs, channels_last=channels_last))


@pytest.mark.parametrize("method", ["kd", "dkd", "nkd"])
def test_plugin_loss_reaches_every_student_weight_but_no_teacher_weight(method):
    torch.manual_seed(0)
    student, teacher = build_model("resnet20", 10), tiny_teacher()
    plugin = Distillation(teacher, method, warmup_epochs=0)
    trainer = fake_trainer(channels_last=True)
    plugin.setup(trainer)
    assert teacher.training is False and not any(p.requires_grad for p in teacher.parameters())
    assert teacher[0].weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    plugin.loss(trainer, images, labels, student(images)).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_dkd_warmup_keeps_the_papers_share_of_the_run():
    plugin = Distillation(tiny_teacher(), "dkd")
    plugin.setup(fake_trainer(epochs=24, steps_per_epoch=10))  # 24 * 20/240 = 2 epochs = 20 steps
    assert plugin.warmup_steps == 20
    plugin.setup(fake_trainer(epochs=480, steps_per_epoch=10))  # capped at the paper's 20 epochs
    assert plugin.warmup_steps == 200
    assert [linear_ramp(s, 20) for s in (0, 9, 19, 50)] == [0.05, 0.5, 1.0, 1.0]
    assert linear_ramp(0, 0) == 1.0
    kd = Distillation(tiny_teacher(), "kd")
    kd.setup(fake_trainer(epochs=24, steps_per_epoch=10))
    assert kd.warmup_steps == 0 and (kd.T, kd.weight) == (4.0, 0.9)

    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    student = torch.randn(3, 10)
    plugin.setup(fake_trainer(epochs=24, steps_per_epoch=10, step=0))
    with torch.no_grad():
        full = dkd_loss(student, plugin.teacher(images), labels)
    assert plugin.loss(fake_trainer(step=0), images, labels, student).item() == pytest.approx(0.05 * full.item())


def test_trainer_step_updates_the_student_and_leaves_the_teacher_untouched(tiny):
    train, _ = tiny
    torch.manual_seed(0)
    student, teacher = build_model("resnet20", 10), tiny_teacher()
    student_before = copy.deepcopy(student.state_dict())
    teacher_before = copy.deepcopy(teacher.state_dict())  # BN running stats too: the teacher stays in eval mode
    Trainer(student, quick_config(), [Distillation(teacher, "dkd")], device=torch.device("cpu"),
            quiet=True).fit(train, None)
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_class_count_mismatch_names_both_counts(tiny, tmp_path):
    train, _ = tiny
    student = build_model("resnet20", 10)
    trainer = Trainer(student, quick_config(), [Distillation(tiny_teacher(100))], device=torch.device("cpu"),
                      quiet=True)
    with pytest.raises(CifarpressError, match="teacher has 100 outputs, student 10"):
        trainer.fit(train, None)
    path = save_model(tmp_path / "teacher.pt", build_model("resnet20", 100), "resnet20", 100, "cifar100")
    with pytest.raises(CifarpressError, match="teacher has 100 outputs, student 10"):
        load_teacher(str(path), 10)


def test_load_teacher_from_files_and_builtins(tmp_path):
    teacher = load_teacher("builtin:resnet20-cifar10", 10)
    assert isinstance(teacher, nn.Module) and teacher.training is False
    with pytest.raises(CifarpressError, match="not found"):
        load_teacher(str(tmp_path / "missing.pt"), 10)
    with pytest.raises(CifarpressError, match="no built-in checkpoint 'nope'"):
        load_teacher("builtin:nope", 10)


def test_distillation_composes_with_weight_ema(tiny):
    train, test = tiny
    torch.manual_seed(0)
    ema = WeightEMA(decay=0.9)
    plugins = [Distillation(tiny_teacher(), "nkd"), ema]
    result = Trainer(build_model("resnet20", 10), quick_config(), plugins, device=torch.device("cpu"),
                     quiet=True).fit(train, test)
    assert ema.updates == 3 and result.model is ema.shadow
    metrics = result.history[-1]
    assert metrics["teacher_s"] > 0 and 0 < metrics["teacher_time_fraction"] < 1
    assert metrics["images_per_s_without_teacher"] > metrics["images_per_s"]
    assert math.isfinite(metrics["train_loss"]) and 0 <= result.top1 <= 100
