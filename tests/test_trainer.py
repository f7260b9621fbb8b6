"""cifarpress.train.trainer: learning, schedules, plug-in hooks, EMA, checkpoint/resume."""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

from cifarpress.utils.modules import unwrap
from cifarpress.data import load_split
from cifarpress.errors import CifarpressError
from cifarpress.models import build_model
from cifarpress.train.ema import WeightEMA
from cifarpress.train.trainer import Plugin, TrainConfig, Trainer, evaluate, lr_factor


@pytest.fixture(scope="module")
def tiny(tiny_cifar_root):
    return (load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False),
            load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False))


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def quick_config(**overrides) -> TrainConfig:
    base = dict(epochs=1, batch_size=20, lr=0.05, max_steps_per_epoch=2, eval_batch_size=100)
    return TrainConfig(**(base | overrides))


def cpu() -> torch.device:
    return torch.device("cpu")


# -- learning -----------------------------------------------------------------------

def test_resnet20_beats_chance_on_tiny_data(tiny):
    train, test = tiny
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    before = evaluate(model, test)
    cfg = TrainConfig(epochs=5, batch_size=32, lr=0.1, seed=0, eval_batch_size=100)  # 6 steps an epoch
    result = Trainer(model, cfg, device=cpu(), quiet=True).fit(train, test)
    assert len(result.history) == 5
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.top1 == result.history[-1]["top1"]
    assert result.top1 > 60.0, (before, [h["top1"] for h in result.history])
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # the returned model is a plain, contiguous module that reproduces the reported accuracy
    assert evaluate(result.model, test) == pytest.approx(result.top1)
    assert all(p.is_contiguous() for p in result.model.parameters())


def test_lr_factor_schedule_shapes():
    total = 100
    for schedule, start in (("onecycle", 0.04), ("cosine", 0.0)):
        f = [lr_factor(s, total, schedule, 0.2) for s in range(total + 1)]
        warm = f[:20]
        assert all(b > a for a, b in zip(warm, warm[1:]))  # warm-up rises
        assert warm[0] == pytest.approx(start + (1 - start) / 20)
        assert max(f) == pytest.approx(1.0) and f[19] == pytest.approx(1.0)
        decay = f[20:]
        assert all(b <= a for a, b in zip(decay, decay[1:]))  # then falls monotonically
        assert f[-2] < 0.01 and f[-1] == pytest.approx(0.0, abs=1e-12)  # ends near 0
        assert f[60] == pytest.approx(0.5)  # cosine midpoint of the decay
    assert {lr_factor(s, total, "constant", 0.2) for s in range(total)} == {1.0}
    # no warm-up when the run is too short for one warm-up step
    assert lr_factor(0, 5, "onecycle", 0.15) == pytest.approx(1.0)


def test_learning_rate_follows_the_schedule(tiny):
    train, _ = tiny
    seen = []

    class LrProbe(Plugin):
        name = "lr-probe"

        def after_step(self, trainer):
            seen.append(self.optimizer.param_groups[0]["lr"])

        def configure_optimizer(self, trainer, optimizer):
            self.optimizer = optimizer
            return optimizer

    cfg = quick_config(epochs=2, max_steps_per_epoch=5, lr=0.4, schedule="cosine", warmup_fraction=0.2)
    Trainer(small_net(), cfg, [LrProbe()], device=cpu(), quiet=True).fit(train, None)
    want = [0.4 * lr_factor(s + 1, 10, "cosine", 0.2) for s in range(10)]  # lr after each step
    assert seen == pytest.approx(want)


# -- plug-ins -------------------------------------------------------------------------

class Recorder(Plugin):
    """Logs every hook call into a shared list and can add `bias_push * fc.bias.sum()` to the loss."""

    def __init__(self, tag: str, log: list, bias_push: float = 0.0):
        self.name = f"recorder-{tag}"
        self.tag, self.log, self.bias_push = tag, log, bias_push
        self.grads: list[dict] = []
        self.shapes = []

    def _note(self, event):
        self.log.append((self.tag, event))

    def setup(self, trainer):
        self._note("setup")

    def configure_optimizer(self, trainer, optimizer):
        self._note("configure_optimizer")
        return optimizer

    def before_step(self, trainer, images, labels):
        self._note("before_step")

    def forward_context(self, trainer):
        recorder = self

        class Around:
            def __enter__(self):
                recorder._note("forward:enter")
                recorder.inside = True

            def __exit__(self, *exc):
                recorder._note("forward:exit")
                recorder.inside = False

        return Around()

    def before_optimizer_step(self, trainer, optimizer):
        grads = [p.grad for p in unwrap(trainer.model).parameters()]
        self._note(f"before_optimizer_step:{all(g is not None for g in grads)}")

    def loss(self, trainer, images, labels, logits):
        self._note(f"loss:{getattr(self, 'inside', False)}")  # inside the forward context
        self.shapes.append((tuple(images.shape), tuple(labels.shape), tuple(logits.shape)))
        if self.bias_push:
            return self.bias_push * unwrap(trainer.model)[-1].bias.sum()
        return None

    def after_step(self, trainer):
        self._note("after_step")
        self.grads.append({n: p.grad.clone() for n, p in unwrap(trainer.model).named_parameters()})

    def eval_model(self, trainer, model):
        self._note("eval_model")
        return model

    def on_epoch_end(self, trainer, epoch, metrics):
        self._note(f"on_epoch_end:{epoch}:{'top1' in metrics}")

    def finalize(self, trainer, model):
        self._note("finalize")
        return model

    def state_dict(self):
        self._note("state_dict")
        return {"calls": len(self.log)}


def test_hooks_are_called_in_documented_order(tiny, tmp_path):
    train, test = tiny
    log = []
    rec = Recorder("a", log)
    cfg = quick_config(epochs=2, max_steps_per_epoch=2)
    result = Trainer(small_net(), cfg, [rec], run_dir=tmp_path, device=cpu(), quiet=True).fit(train, test)
    step = ["before_step", "forward:enter", "loss:True", "forward:exit", "before_optimizer_step:True", "after_step"]
    epoch = step + step + ["eval_model"]
    want = (["setup", "configure_optimizer"]
            + epoch + ["on_epoch_end:1:True", "state_dict"]
            + epoch + ["on_epoch_end:2:True", "state_dict"]
            + ["finalize"])
    assert [e for _, e in log] == want
    assert rec.shapes == [((20, 3, 32, 32), (20,), (20, 10))] * 4
    assert len(result.history) == 2 and (tmp_path / "last.pt").exists()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["plugins"] == {"0:recorder-a": {"calls": 32}}
    for metrics in result.history:  # every epoch records the training process's peak memory (CPU: VmHWM)
        assert metrics["peak_memory"] in ("process_peak_rss", "process_peak_rss_lifetime")
        assert metrics["peak_memory_bytes"] > 50 * 2**20


def test_extra_loss_changes_gradients_and_plugins_compose(tiny):
    train, _ = tiny
    cfg = quick_config(max_steps_per_epoch=1)

    plain = Recorder("plain", [])
    Trainer(small_net(), cfg, [plain], device=cpu(), quiet=True).fit(train, None)

    log = []
    a, b = Recorder("a", log, bias_push=0.5), Recorder("b", log, bias_push=2.0)
    Trainer(small_net(), cfg, [a, b], device=cpu(), quiet=True).fit(train, None)

    # both plug-ins called for every hook, in list order (finalize in reverse: the outermost hands on first)
    assert log == [("a", "setup"), ("b", "setup"), ("a", "configure_optimizer"), ("b", "configure_optimizer"),
                   ("a", "before_step"), ("b", "before_step"),
                   ("a", "forward:enter"), ("b", "forward:enter"), ("a", "loss:True"), ("b", "loss:True"),
                   ("b", "forward:exit"), ("a", "forward:exit"),  # contexts close innermost first
                   ("a", "before_optimizer_step:True"), ("b", "before_optimizer_step:True"),
                   ("a", "after_step"), ("b", "after_step"),
                   ("a", "on_epoch_end:1:False"), ("b", "on_epoch_end:1:False"),
                   ("b", "finalize"), ("a", "finalize")]
    g0, g1 = plain.grads[0], a.grads[0]
    bias = "5.bias"
    # d/d bias of (0.5 + 2.0) * bias.sum() adds exactly 2.5 to every bias gradient ...
    assert torch.allclose(g1[bias] - g0[bias], torch.full_like(g0[bias], 2.5), atol=1e-5)
    # ... and leaves every other gradient untouched
    for name in g0:
        if name != bias:
            assert torch.equal(g0[name], g1[name]), name


def test_label_weights_of_plugins_scale_the_cross_entropy(tiny):
    train, _ = tiny
    cfg = quick_config(max_steps_per_epoch=1)
    plain = Recorder("plain", [])
    Trainer(small_net(), cfg, [plain], device=cpu(), quiet=True).fit(train, None)

    scaled = Recorder("scaled", [])
    half, fifth = Plugin(), Plugin()
    half.label_weight, fifth.label_weight = 0.5, 0.2
    trainer = Trainer(small_net(), cfg, [scaled, half, fifth], device=cpu(), quiet=True)
    assert trainer.label_weight == pytest.approx(0.1)
    trainer.fit(train, None)
    # same model, same batch: every gradient is the plain one times 0.5 x 0.2
    for name, grad in plain.grads[0].items():
        assert torch.allclose(scaled.grads[0][name], 0.1 * grad, atol=1e-6, rtol=1e-4), name


# -- EMA ------------------------------------------------------------------------------

def hand_ema(snapshots: list[torch.Tensor], start: torch.Tensor, decay: float) -> torch.Tensor:
    shadow = start.clone()
    for k, live in enumerate(snapshots, start=1):
        d = min(decay, (1 + k) / (10 + k))
        shadow = d * shadow + (1 - d) * live
    return shadow


def test_ema_matches_hand_computed_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    trainer = types.SimpleNamespace(model=model, step=0)
    ema = WeightEMA(decay=0.5)
    ema.setup(trainer)
    start = model[0].weight.detach().clone()
    start_mean = model[1].running_mean.clone()
    snapshots, means = [], []
    for step in range(1, 13):  # the ramp reaches the 0.5 cap at update 8
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
            model[1].running_mean.add_(1.0)
        model[1].num_batches_tracked += 1
        trainer.step = step
        ema.after_step(trainer)
        snapshots.append(model[0].weight.detach().clone())
        means.append(model[1].running_mean.clone())
    assert ema.updates == 12
    assert not torch.allclose(ema.shadow[0].weight, model[0].weight)
    assert torch.allclose(ema.shadow[0].weight, hand_ema(snapshots, start, 0.5), atol=1e-6)
    # BN running statistics are averaged like the weights (see the module docstring)
    assert torch.allclose(ema.shadow[1].running_mean, hand_ema(means, start_mean, 0.5), atol=1e-6)
    assert ema.shadow[1].num_batches_tracked.item() == 12  # integer buffers are copied
    assert not ema.shadow[0].weight.requires_grad


def test_ema_every_n_steps_and_bad_decay():
    model = nn.Linear(2, 2)
    trainer = types.SimpleNamespace(model=model, step=0)
    ema = WeightEMA(decay=0.9, every=3)
    ema.setup(trainer)
    for step in range(1, 10):
        trainer.step = step
        ema.after_step(trainer)
    assert ema.updates == 3
    with pytest.raises(ValueError):
        WeightEMA(decay=1.0)


def test_ema_state_resumes_before_and_after_setup():
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    trainer = types.SimpleNamespace(model=model, step=0)
    ema = WeightEMA(decay=0.9)
    ema.setup(trainer)

    def steps(e, k0, k1):
        torch.manual_seed(k0)
        for step in range(k0, k1):
            with torch.no_grad():
                model.weight.add_(torch.randn_like(model.weight))
            trainer.step = step
            e.after_step(trainer)

    steps(ema, 1, 6)
    saved = copy.deepcopy(ema.state_dict())
    live_at_save = copy.deepcopy(model.state_dict())
    steps(ema, 6, 11)  # the uninterrupted continuation
    want = ema.shadow.weight.clone()

    for load_first in (True, False):
        model.load_state_dict(live_at_save)
        resumed = WeightEMA(decay=0.9)
        if load_first:  # how Trainer restores a plug-in built before setup
            resumed.load_state_dict(copy.deepcopy(saved))
            resumed.setup(trainer)
        else:
            resumed.setup(trainer)
            resumed.load_state_dict(copy.deepcopy(saved))
        assert resumed.updates == 5
        assert torch.equal(resumed.shadow.weight, saved["shadow"]["weight"])
        assert not torch.equal(resumed.shadow.weight, model.weight)
        steps(resumed, 6, 11)
        assert resumed.updates == 10
        assert torch.equal(resumed.shadow.weight, want)


def test_ema_plugin_in_training_hands_on_the_average(tiny):
    train, test = tiny
    ema = WeightEMA(decay=0.9)
    trainer = Trainer(small_net(), quick_config(epochs=1, max_steps_per_epoch=4), [ema], device=cpu(), quiet=True)
    result = trainer.fit(train, test)
    assert ema.updates == 4
    assert result.model is ema.shadow
    live = unwrap(trainer.model)
    assert not torch.allclose(ema.shadow[0].weight, live[0].weight)
    assert result.top1 == pytest.approx(evaluate(ema.shadow, test))


# -- checkpoint / resume ------------------------------------------------------------

class Interrupt(Plugin):
    """Raises KeyboardInterrupt from after_step at optimizer step `at` (None: never)."""

    name = "interrupt"

    def __init__(self, at: int | None = None):
        self.at = at
        self.first = None  # (epoch, step) when the first step of this run finished

    def after_step(self, trainer):
        if self.first is None:
            self.first = (trainer.epoch, trainer.step)
        if trainer.step == self.at:
            raise KeyboardInterrupt


RESUME_CFG = dict(epochs=3, max_steps_per_epoch=4, lr=0.05, seed=3)


def weights(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in unwrap(model).state_dict().items()}


def test_interrupted_run_resumes_to_identical_weights(tiny, tmp_path):
    train, test = tiny
    cfg = quick_config(**RESUME_CFG)

    ref_ema = WeightEMA(decay=0.9)
    ref_trainer = Trainer(small_net(), cfg, [Interrupt(), ref_ema], run_dir=tmp_path / "ref", device=cpu(), quiet=True)
    ref = ref_trainer.fit(train, test)

    stopper = Interrupt(at=6)  # the middle of epoch 2
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(small_net(), cfg, [stopper, WeightEMA(decay=0.9)], run_dir=run, device=cpu(), quiet=True).fit(train, test)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1

    # a different starting model proves the weights come from the checkpoint
    again = Interrupt()
    ema = WeightEMA(decay=0.9)
    trainer = Trainer(small_net(seed=99), cfg, [again, ema], run_dir=run, device=cpu(), quiet=True)
    result = trainer.fit(train, test)
    assert result.resumed_from == 1 and again.first == (1, 5)
    assert trainer.epoch == 3 and trainer.step == 12
    assert len(result.history) == 3 and [h["epoch"] for h in result.history] == [1, 2, 3]
    for got, want in zip(result.history, ref.history):
        assert got["train_loss"] == want["train_loss"] and got["top1"] == want["top1"]
    ref_w, got_w = weights(ref_trainer.model), weights(trainer.model)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], got_w[k]), k
    assert ema.updates == ref_ema.updates == 12
    for k, v in ref_ema.shadow.state_dict().items():
        assert torch.equal(v, ema.shadow.state_dict()[k]), k
    assert result.top1 == ref.top1

    # a finished run re-run with the same settings trains nothing and reports the same
    idle = Interrupt()
    done = Trainer(small_net(), cfg, [idle, WeightEMA(decay=0.9)], run_dir=run, device=cpu(), quiet=True).fit(train, test)
    assert idle.first is None and done.resumed_from == 3 and len(done.history) == 3
    assert done.top1 == ref.top1


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
    train, _ = tiny
    Trainer(small_net(), quick_config(epochs=1), run_dir=tmp_path, device=cpu(), quiet=True).fit(train, None)
    for changed in (quick_config(epochs=2), quick_config(epochs=1, lr=0.1)):
        with pytest.raises(CifarpressError, match="--force"):
            Trainer(small_net(), changed, run_dir=tmp_path, device=cpu(), quiet=True).fit(train, None)
    with pytest.raises(CifarpressError, match="--force"):  # the plug-in list is part of the settings
        Trainer(small_net(), quick_config(epochs=1), [WeightEMA()], run_dir=tmp_path, device=cpu(), quiet=True).fit(train, None)


def test_resume_without_test_split(tiny, tmp_path):
    train, _ = tiny
    cfg = quick_config(epochs=1)
    first = Trainer(small_net(), cfg, run_dir=tmp_path, device=cpu(), quiet=True).fit(train, None)
    assert math.isnan(first.top1) and "top1" not in first.history[0]
    again = Trainer(small_net(), cfg, run_dir=tmp_path, device=cpu(), quiet=True).fit(train, None)
    assert again.resumed_from == 1 and math.isnan(again.top1)


def test_batch_larger_than_data_is_a_user_error(tiny):
    train, _ = tiny
    with pytest.raises(CifarpressError, match="lower it"):
        Trainer(small_net(), quick_config(batch_size=1000), device=cpu(), quiet=True).fit(train, None)


def test_divergence_is_reported(tiny):
    train, _ = tiny

    class Explode(Plugin):
        name = "explode"

        def loss(self, trainer, images, labels, logits):
            return logits.sum() * float("inf")

    with pytest.raises(CifarpressError, match="diverged"):
        Trainer(small_net(), quick_config(), [Explode()], device=cpu(), quiet=True).fit(train, None)
