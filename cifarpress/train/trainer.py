"""The one training loop every compression technique plugs into.

A technique is a `Plugin`: it overrides only the hooks it needs, and the
Trainer calls every plug-in's hook in order, so pruning, a quantizer, a
distillation loss and a memory saver compose in a single pass of training.

Hook order for one run:
    setup(trainer)                   -> may replace trainer.model (swap layers, add gates)
    configure_optimizer(trainer, o)  -> may wrap or replace the optimizer (HESSO, DHSPG)
    per step:
        before_step(trainer, images, labels)  -> e.g. keep the weights the step starts from (DHSPG)
        forward_context(trainer)     -> a context manager entered around forward and loss, or None
                                        (saved-tensor hooks of a memory saver)
        loss(trainer, images, labels, logits) -> extra loss term or None (KD, gate polarization)
        before_optimizer_step(trainer, optimizer) -> gradients are final and unscaled (AMP): read or
                                        edit them (gradient statistics, normalization)
        after_step(trainer)          -> e.g. update an EMA, project groups to zero
    per epoch:
        eval_model(trainer, model)   -> the model to evaluate (EMA weights, say)
        on_epoch_end(trainer, epoch, metrics)
    finalize(trainer, model)         -> the model to hand on (cut pruned channels, fold quantizers), called in
                                        reverse phase order: the EMA hands its averaged copy inward, and the
                                        quantizer and the pruner finish that copy, not the discarded live one
    state_dict() / load_state_dict() -> saved inside every epoch checkpoint, for resume

The same code runs under `torchrun` (DistributedDataParallel, gloo on CPU,
NCCL on GPU): each rank trains on its shard, rank 0 alone writes files.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from cifarpress.data import CifarSplit, as_batches, input_shape_of
from cifarpress.errors import CifarpressError
from cifarpress.train.options import from_scratch
from cifarpress.utils.io import atomic_torch_save
from cifarpress.utils.modules import unwrap

console = Console(stderr=True)
LOG_EVERY_S = float(os.environ.get("CIFARPRESS_PROGRESS_EVERY", "30"))


@dataclass
class TrainConfig:
    """The loop's settings. Defaults are those of training from scratch (`cifarpress train`), taken from
    train.options, the one definition; a recipe's training stages pass their own (fine-tuning) values."""

    epochs: int = from_scratch("epochs")
    batch_size: int = from_scratch("batch_size")
    lr: float = from_scratch("lr")
    momentum: float = from_scratch("momentum")
    nesterov: bool = True
    weight_decay: float = from_scratch("weight_decay")
    schedule: str = from_scratch("schedule")  # "onecycle" | "cosine" | "constant"
    warmup_fraction: float = from_scratch("warmup_fraction")  # share of steps spent warming up (one-cycle, cosine)
    label_smoothing: float = from_scratch("label_smoothing")
    seed: int = from_scratch("seed")
    channels_last: bool = True
    amp: bool = True  # only takes effect on CUDA
    max_steps_per_epoch: int | None = None  # cap for quick runs and tests
    eval_batch_size: int = 500


class Plugin:
    """Base class: every hook is a no-op. Override what a technique needs."""

    name = "plugin"
    # Where it acts in the pass (train.phases.Phase); the Trainer refuses plug-ins listed against this order.
    # None: no place in the order (a test's or a user's helper plug-in).
    phase: int | None = None
    # Weight of the cross-entropy on the labels; the Trainer multiplies those of all
    # plug-ins (vanilla KD, for one, trains on 0.1 x CE + 0.9 x KD).
    label_weight: float = 1.0
    # Keys this plug-in adds to the epoch's metrics in on_epoch_end that the epoch line should show.
    shown_metrics: tuple[str, ...] = ()

    def setup(self, trainer: "Trainer") -> None: ...

    def configure_optimizer(self, trainer: "Trainer", optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def before_step(self, trainer: "Trainer", images: torch.Tensor, labels: torch.Tensor) -> None: ...

    def forward_context(self, trainer: "Trainer") -> contextlib.AbstractContextManager | None:
        return None

    def before_optimizer_step(self, trainer: "Trainer", optimizer: torch.optim.Optimizer) -> None: ...

    def loss(self, trainer: "Trainer", images: torch.Tensor, labels: torch.Tensor,
             logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_step(self, trainer: "Trainer") -> None: ...

    def eval_model(self, trainer: "Trainer", model: nn.Module) -> nn.Module:
        return model

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None: ...

    def finalize(self, trainer: "Trainer", model: nn.Module) -> nn.Module:
        return model

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def lr_factor(step: int, total: int, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of the peak learning rate at `step` of `total`."""
    if schedule == "constant":
        return 1.0
    warmup = int(total * warmup_fraction)
    if step < warmup:
        start = 0.04 if schedule == "onecycle" else 0.0  # one-cycle starts at peak/25
        return start + (1.0 - start) * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def distributed_context() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # A group still alive at interpreter teardown can abort the process (gloo:
        # "terminate called without an active exception", exit -6); close it first.
        atexit.register(_destroy_process_group)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device("cpu")


@torch.no_grad()
def sync_from_rank0(model: nn.Module) -> None:
    """Copy rank 0's weights and buffers to every rank, in place.

    DDP keeps parameters equal, but each rank updates its BN running statistics
    (and a plug-in's EMA copy of them) from its own shard, so without this every
    rank would evaluate a slightly different model than the one rank 0 saves.
    """
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, 0)


@torch.no_grad()
def predict(model: nn.Module, split, batch_size: int = 500, device=None) -> torch.Tensor:
    """Predicted class of every image of `split` (or of a user's (images, labels) batches; on the CPU, in order)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(images).argmax(1).cpu() for images, _ in as_batches(split, batch_size, False, device=device)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 500, device=None,
             shard: tuple[int, int] = (0, 1), channels_last: bool = False) -> float:
    """Top-1 accuracy (%) of `model` on a CIFAR split, or on a user's (images, labels) batches (data.as_batches);
    sums across ranks when sharded (a user's loader is read whole on every rank: the ratio stays right)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = as_batches(split, batch_size, False, shard=shard, device=device, channels_last=channels_last,
                        what="evaluation data")
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in loader:
        logits = model(images)
        counts[0] += (logits.argmax(1) == labels).sum()
        counts[1] += len(labels)
    if shard[1] > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return float(100.0 * counts[0] / counts[1].clamp(min=1))


def read_resume_file(path: Path, device=None) -> dict:
    """A run folder's last.pt, loaded weights-only: a planted file can hold data, never code.

    Every plug-in's state_dict() must therefore be tensors, numbers, strings and containers of them."""
    fix = f"delete {path} to train this stage from its start again, or pass --force"
    try:
        if path.stat().st_size == 0:
            raise CifarpressError(f"{path} is empty (a run killed while writing it?); {fix}")
        state = torch.load(path, map_location=device, weights_only=True)
    except CifarpressError:
        raise
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CifarpressError(f"{path} is not a checkpoint cifarpress will load: it holds objects other than "
                              f"tensors and plain data ({first}); {fix}") from None
    except Exception as exc:  # truncated zip, text, a folder: torch raises many types
        detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CifarpressError(f"{path} is unreadable ({detail}); {fix}") from None
    keys = {"epoch", "step", "config", "model", "optimizer", "scheduler", "history", "plugins"}
    if not isinstance(state, dict) or not keys <= state.keys():
        raise CifarpressError(f"{path} is not a cifarpress training checkpoint (last.pt); {fix}")
    return state


def reset_peak_memory(device: torch.device) -> None:
    """Start an epoch's memory high-water mark: CUDA's allocator counter, or this process's VmHWM (Linux resets
    it when "5" is written to /proc/self/clear_refs; elsewhere the mark stays the process's lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> dict:
    """The epoch's peak memory: CUDA max allocated on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory": "cuda_max_allocated"}
    from cifarpress.utils.memory import (
        peak_rss_bytes,  # the bench worker's reader: VmHWM, else ru_maxrss
    )

    return {"peak_memory_bytes": peak_rss_bytes(), "peak_memory": "process_peak_rss"}


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and floating buffers (BatchNorm statistics included) holding NaN or Inf."""
    bad = []
    for name, tensor in unwrap(model).state_dict().items():
        if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
            bad.append(name)
    return bad


def check_plugin_order(plugins: list[Plugin]) -> None:
    """One line when plug-ins are listed against their phases (a quantizer after the EMA would average
    a float copy; a loss term before the quantizer would see float logits)."""
    placed = [p for p in plugins if p.phase is not None]
    for earlier, later in zip(placed, placed[1:]):
        if later.phase < earlier.phase:
            from cifarpress.train.phases import Phase

            raise CifarpressError(
                f"plug-in '{later.name}' ({Phase(later.phase).name}) is listed after '{earlier.name}' "
                f"({Phase(earlier.phase).name}); list plug-ins in phase order: "
                f"{' < '.join(ph.name for ph in Phase)}")


@dataclass
class TrainResult:
    """What Trainer.fit (and the API's run_stage) hands back: the model to hand on (pruned, quantized or the
    EMA copy, as the plug-ins' finalize left it), its top-1 on the test data (NaN without), every epoch's
    metrics, and the epoch a resumed run started after (0 when it ran from the start)."""

    model: nn.Module
    top1: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


class Trainer:
    """SGD training with plug-ins, per-epoch evaluation and atomic resumable checkpoints.

    `run_dir` receives `last.pt` after every epoch; a Trainer built on the same
    `run_dir` with the same config continues after the last finished epoch.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, plugins: list[Plugin] | None = None,
                 run_dir: str | os.PathLike | None = None, device: torch.device | None = None,
                 quiet: bool = False):
        self.config = config
        self.plugins = list(plugins or [])
        check_plugin_order(self.plugins)
        self.run_dir = Path(run_dir) if run_dir else None
        self.rank, self.world = distributed_context()
        self.device = device or default_device()
        self.is_main = self.rank == 0
        self.quiet = quiet or not self.is_main
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_shape: tuple[int, ...] | None = None  # one image's (C, H, W), known once fit() sees the data
        self.epoch = 0  # epochs finished
        self.step = 0  # optimizer steps taken
        self.history: list[dict] = []

    @property
    def label_weight(self) -> float:
        return math.prod(p.label_weight for p in self.plugins)

    # -- construction -----------------------------------------------------
    def _build_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        c = self.config
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                # Weight decay on BN affine and biases only shrinks scales the next
                # layer undoes; it costs accuracy on small CIFAR nets.
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0)

    def _checkpoint_path(self) -> Path | None:
        return self.run_dir / "last.pt" if self.run_dir else None

    def _config_key(self) -> dict:
        key = asdict(self.config)
        key["plugins"] = [p.name for p in self.plugins]
        key["world"] = self.world
        if self.label_weight != 1.0:
            key["label_weight"] = self.label_weight
        return key

    def _save(self, optimizer, scheduler, scaler=None) -> None:
        path = self._checkpoint_path()
        if path is None or not self.is_main:
            return
        atomic_torch_save({
            "epoch": self.epoch, "step": self.step, "config": self._config_key(),
            "model": unwrap(self.model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": self.history,
            "scaler": scaler.state_dict() if scaler is not None else {},
            "plugins": {f"{i}:{p.name}": p.state_dict() for i, p in enumerate(self.plugins)},
        }, path)

    def _maybe_resume(self, optimizer, scheduler, scaler=None) -> int:
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return 0
        state = read_resume_file(path, self.device)
        if state["config"] != self._config_key():
            raise CifarpressError(
                f"{path} was written with different training settings; pass --force to start over "
                f"or choose another output folder"
            )
        unwrap(self.model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):  # AMP loss scale, so a resumed run skips no extra steps
            scaler.load_state_dict(state["scaler"])
        for i, p in enumerate(self.plugins):
            p.load_state_dict(state["plugins"].get(f"{i}:{p.name}", {}))
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        if not self.quiet:
            console.print(f"[yellow]resuming from {path} after epoch {self.epoch}[/]")
        return self.epoch

    # -- training -----------------------------------------------------------
    def fit(self, train, test) -> TrainResult:
        """Train on `train` and evaluate each epoch on `test` (None: no evaluation). Each is a CIFAR split (the
        fast in-memory loader, augmented) or a user's re-iterable of (images, labels) batches, such as a
        DataLoader, used as it comes (its own batch size, transforms and shuffling)."""
        c = self.config
        torch.manual_seed(c.seed)
        per_rank_batch = max(1, c.batch_size // self.world)
        loader = as_batches(train, per_rank_batch, True, seed=c.seed, shard=(self.rank, self.world),
                            device=self.device, channels_last=c.channels_last, what="training data")
        if c.max_steps_per_epoch is None:
            steps_per_epoch = len(loader)
        else:
            try:
                steps_per_epoch = min(len(loader), c.max_steps_per_epoch)
            except CifarpressError:  # a loader without a length: the cap is the epoch
                steps_per_epoch = c.max_steps_per_epoch
        if steps_per_epoch == 0:
            if isinstance(train, CifarSplit):
                raise CifarpressError(f"batch size {c.batch_size} exceeds the {len(train)} training images; lower it")
            raise CifarpressError("the training data yields no batches; give it at least one (images, labels) batch")
        # One image's shape, for plug-ins that probe the model (a pruner tracing its channels).
        self.input_shape = input_shape_of(train, "training data")
        # Known before setup() so plug-ins can plan schedules over the whole run (pruning periods, warm-ups).
        self.steps_per_epoch, self.total_steps = steps_per_epoch, steps_per_epoch * c.epochs
        total = self.total_steps
        for p in self.plugins:
            p.setup(self)
        base = self.model
        optimizer = self._build_optimizer(base)
        for p in self.plugins:
            optimizer = p.configure_optimizer(self, optimizer)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(base, device_ids=ids)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, c.schedule, c.warmup_fraction))
        use_amp = c.amp and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        resumed = self._maybe_resume(optimizer, scheduler, scaler)

        criterion = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
        top1 = self.history[-1].get("top1", float("nan")) if self.history else float("nan")

        progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
            TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1f}% {task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(), console=console, disable=self.quiet or not console.is_terminal,
            transient=True,
        )
        with progress:
            while self.epoch < c.epochs:
                loader.set_epoch(self.epoch)
                reset_peak_memory(self.device)
                self.model.train()
                task = progress.add_task("train", total=steps_per_epoch, epoch=self.epoch + 1, loss=0.0, acc=0.0, ips=0.0)
                sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n
                t0 = last_line = time.perf_counter()
                for i, (images, labels) in enumerate(loader):
                    if i >= steps_per_epoch:
                        break
                    for p in self.plugins:
                        p.before_step(self, images, labels)
                    with contextlib.ExitStack() as forward:
                        forward.enter_context(torch.autocast(self.device.type, dtype=torch.float16, enabled=use_amp))
                        for p in self.plugins:
                            context = p.forward_context(self)
                            if context is not None:
                                forward.enter_context(context)
                        logits = self.model(images)
                        loss = self.label_weight * criterion(logits, labels)
                        for p in self.plugins:
                            extra = p.loss(self, images, labels, logits)
                            if extra is not None:
                                loss = loss + extra
                    if not torch.isfinite(loss):
                        raise CifarpressError(
                            f"training diverged (loss {loss.item()}) at epoch {self.epoch + 1}; lower the learning rate")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # plug-ins see true gradients (a no-op without AMP)
                    for p in self.plugins:
                        p.before_optimizer_step(self, optimizer)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    self.step += 1
                    for p in self.plugins:
                        p.after_step(self)
                    n = len(labels)
                    # in place with a Python count: torch.tensor(n, device=cuda) would be a host sync every step
                    sums[0] += loss.detach().double() * n
                    sums[1] += (logits.argmax(1) == labels).sum()
                    sums[2] += n
                    if not progress.disable and (i % 10 == 0 or i + 1 == steps_per_epoch):
                        s = sums.tolist()
                        progress.update(task, completed=i + 1, loss=s[0] / s[2], acc=100 * s[1] / s[2],
                                        ips=s[2] * self.world / (time.perf_counter() - t0))
                    elif progress.disable and not self.quiet and time.perf_counter() - last_line > LOG_EVERY_S:
                        # Off a terminal (a log file, CI) a line now and then, so a long epoch is not silent.
                        last_line = time.perf_counter()
                        s = sums.tolist()
                        console.print(f"epoch {self.epoch + 1}/{c.epochs}: step {i + 1}/{steps_per_epoch}  "
                                      f"loss {s[0] / s[2]:.3f}  {s[2] * self.world / (last_line - t0):.0f} img/s",
                                      highlight=False)
                progress.remove_task(task)
                train_time = time.perf_counter() - t0
                if self.world > 1:
                    dist.all_reduce(sums)
                s = sums.tolist()
                self.epoch += 1
                metrics = {"epoch": self.epoch, "train_loss": s[0] / s[2], "train_acc": 100 * s[1] / s[2],
                           "lr": optimizer.param_groups[0]["lr"], "images_per_s": s[2] / train_time,
                           "epoch_s": train_time, **peak_memory(self.device)}
                if test is not None:
                    eval_model = unwrap(self.model)
                    for p in self.plugins:
                        eval_model = p.eval_model(self, eval_model)
                    if self.world > 1:
                        sync_from_rank0(eval_model)
                    top1 = evaluate(eval_model, test, c.eval_batch_size, self.device, (self.rank, self.world),
                                    c.channels_last)
                    metrics["top1"] = top1
                # A diverged run can keep a finite loss while weights or BatchNorm statistics overflow;
                # stop here rather than save it, export it and blame the export.
                diverged = non_finite_tensors(self.model)
                if diverged:
                    raise CifarpressError(
                        f"training diverged at epoch {self.epoch}: {len(diverged)} tensors are NaN or infinite "
                        f"({', '.join(diverged[:3])}); lower the learning rate")
                for p in self.plugins:
                    p.on_epoch_end(self, self.epoch, metrics)
                self.history.append(metrics)
                self._save(optimizer, scheduler, scaler)
                if not self.quiet:
                    console.print(
                        f"epoch {self.epoch}/{c.epochs}  loss {metrics['train_loss']:.3f}  "
                        f"train {metrics['train_acc']:.2f}%  test {metrics.get('top1', float('nan')):.2f}%  "
                        f"{metrics['images_per_s']:.0f} img/s  {train_time:.0f}s  "
                        f"peak {metrics['peak_memory_bytes'] / 2**20:.0f} MiB"
                        + "".join(f"  {k} {metrics[k]:.3f}" for p in self.plugins for k in p.shown_metrics
                                  if isinstance(metrics.get(k), (int, float))))
        model = unwrap(self.model)
        for p in reversed(self.plugins):
            model = p.finalize(self, model)
        model = model.to(memory_format=torch.contiguous_format)
        if test is not None and self.plugins:
            if self.world > 1:
                sync_from_rank0(model)
            top1 = evaluate(model, test, c.eval_batch_size, self.device, (self.rank, self.world))
        return TrainResult(model=model, top1=top1, history=self.history, resumed_from=resumed)
