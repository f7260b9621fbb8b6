"""`cifarpress` command line: train, eval, compress, prune, quantize, export, bench, compare, inspect."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from cifarpress.errors import CifarpressError, RecipeError
from cifarpress.pipeline.recipe import load_recipe, recipe_from_dict, stage_field
from cifarpress.pipeline.run_folder import check_writable
from cifarpress.train.options import from_scratch

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Compress CIFAR-10/100 classifiers (prune, quantize, distill), export them to ONNX/TensorRT "
         "and measure what you ship.",
)
out = Console()
err = Console(stderr=True)

DATA_ROOT_HELP = "Folder holding cifar-10-batches-py / cifar-100-python (default: $CIFARPRESS_DATA, then ~/.cache/cifarpress)."


def user_errors(fn):
    """Turn user-facing errors and Ctrl-C into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CifarpressError as exc:
            _print_error(str(exc), exc)
            raise typer.Exit(exc.exit_code)
        except OSError as exc:  # a path the user gave cannot be read or written (permissions, a full disk)
            where = f" {exc.filename}" if exc.filename else ""
            _print_error(f"{exc.strerror or type(exc).__name__}:{where}; check that path and its permissions", exc)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted: finished epochs and stages are saved; re-run the same command to resume[/]")
            raise typer.Exit(130)

    return wrapper


_debug_flag = {"on": False}  # --debug of the current invocation


def debug_enabled() -> bool:
    return _debug_flag["on"] or os.environ.get("CIFARPRESS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _print_error(message: str, exc: BaseException) -> None:
    # escape: paths and messages may hold [brackets] that are not console markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)
    if debug_enabled():
        import traceback

        cause = exc.__cause__ or exc
        err.print("".join(traceback.format_exception(type(cause), cause, cause.__traceback__)), markup=False,
                  highlight=False)


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="Print the full traceback behind an error "
                                                                     "(same as CIFARPRESS_DEBUG=1).")):
    _debug_flag["on"] = debug


def set_threads(threads: Optional[int]) -> None:
    import torch

    # Under torchrun the ranks share the machine's cores.
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // ranks_here))


@app.command()
@user_errors
def train(
    model: str = typer.Option("resnet20", "--model", "-m", help="Zoo name (see `cifarpress inspect --list`) or package.module:factory."),
    dataset: str = typer.Option("cifar10", help="cifar10 or cifar100."),
    epochs: int = typer.Option(from_scratch("epochs"), min=1),
    batch_size: int = typer.Option(from_scratch("batch_size"), min=1),
    lr: float = typer.Option(from_scratch("lr"), help="Peak learning rate."),
    weight_decay: float = typer.Option(from_scratch("weight_decay")),
    schedule: str = typer.Option(from_scratch("schedule"), help="onecycle, cosine or constant."),
    label_smoothing: float = typer.Option(0.0, min=0.0, max=0.5),
    ema: bool = typer.Option(False, help="Evaluate and keep an exponential moving average of the weights."),
    mesa: bool = typer.Option(False, help="Mesa: keep 8-bit copies of the activations saved for backward "
                                          "(ReLU: 1-bit masks) to cut training memory."),
    init: Optional[str] = typer.Option(None, help="Start from this model file (fine-tuning) instead of random weights."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Run folder (default runs/train-<model>). Holds last.pt, model.pt, metrics.json."),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: all cores)."),
    max_steps_per_epoch: Optional[int] = typer.Option(None, help="Cap steps per epoch (quick trials)."),
    force: bool = typer.Option(False, help="Discard a previous run in the folder instead of resuming it."),
):
    """Train (or fine-tune) a classifier; re-running the same command resumes after the last finished epoch."""
    from cifarpress.data import describe_split, load_split
    from cifarpress.models import trusting
    from cifarpress.pipeline.api import stage_config
    from cifarpress.pipeline.training import run_training

    # a train stage with the from-scratch defaults (train.options) where the options leave them
    body = stage_config("train", epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        schedule=schedule, label_smoothing=label_smoothing, seed=seed,
                        max_steps_per_epoch=max_steps_per_epoch, momentum=from_scratch("momentum"),
                        warmup_fraction=from_scratch("warmup_fraction"), ema=ema, mesa=True if mesa else None)
    set_threads(threads)
    for split in ("train", "test"):  # say what will be trained and measured on (kept in memory; cheap to reload)
        out.print(f"{split}: {describe_split(load_split(dataset, split, data_root))}", highlight=False, soft_wrap=True)
    with trusting(model):  # --model names the factory: an --init file may record it
        result = run_training(arch=model, dataset=dataset, init=init, body=body, data_root=data_root, force=force,
                              out_dir=out_dir or Path("runs") / f"train-{model.replace(':', '_')}")
    if result is not None:
        out.print(f"top-1 {result['top1']:.2f}%  ->  {result['model_path']}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, gloo's worker threads can abort the process during C++ static
        # teardown ("terminate called without an active exception") after all work is
        # done and saved. Wait for every rank, close the group, and leave without that teardown.
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command("eval")
@user_errors
def eval_cmd(
    checkpoint: str = typer.Argument(..., help="Model file (.pt), builtin:NAME, or an exported .onnx."),
    dataset: Optional[str] = typer.Option(None, help="Dataset (default: the one recorded in the model file)."),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    arch: Optional[str] = typer.Option(None, help="Architecture, for a plain state-dict checkpoint."),
    num_classes: Optional[int] = typer.Option(None, help="Class count, for a plain state-dict checkpoint."),
    threads: Optional[int] = typer.Option(None),
):
    """Test-set top-1 accuracy of a model file or an ONNX export."""
    from cifarpress.pipeline.evaluate import evaluate_file

    set_threads(threads)
    print(json.dumps(evaluate_file(checkpoint, dataset, data_root, arch, num_classes, threads)))  # one line


@app.command()
@user_errors
def compress(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/<recipe name>)."),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    force: bool = typer.Option(False, help="Start over instead of resuming after the last finished stage."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch training (default: all cores)."),
):
    """Run a recipe's stages in order and write report.json / report.md in the run folder.

    Each stage writes runs/<name>/<NN>-<stage>/ (model.pt, model.onnx, metrics.json).
    Re-running the same command resumes after the last finished stage."""
    from cifarpress.pipeline.compress import run_recipe

    spec = load_recipe(recipe)
    set_threads(threads)
    run_dir = run_recipe(spec, out_dir, str(data_root) if data_root else None, force)
    # Plain print: the Markdown table must not be re-wrapped to the terminal width.
    print((run_dir / "report.md").read_text(), end="")
    print(f"report: {run_dir / 'report.json'}")


BENCH_BATCH_HELP = "Batch size of the onnxruntime bench of each model (repeat for several; default 1 and 64)."
BENCH_SECONDS_HELP = "Timing budget per batch size of each bench (default 3)."
BENCH_THREADS_HELP = "onnxruntime intra-op threads of the benches (default: all cores)."
CHECKPOINT_HELP = "Model file (.pt) or builtin:NAME to compress."
ARCH_HELP = ("Architecture (zoo name or package.module:factory); default: the one recorded in the model file, "
             "else resnet20. Needed for a plain state-dict checkpoint.")
DATASET_HELP = "cifar10 or cifar100 (default: the one recorded in the model file, else cifar10)."
DISTILL_HELP = "Add a distillation loss from the model entering the stage: kd, dkd or nkd (default: none)."


def _default(stage: str, field: str) -> str:
    """' (default X)' from the recipe stage's own field, so a help text cannot drift from the recipe."""
    value = stage_field(stage, field).default
    return f" (default {value:g})" if isinstance(value, float) else f" (default {value})"


# Options every single-stage command (prune, quantize) shares; None = the stage's default.
Checkpoint = Annotated[str, typer.Option("--checkpoint", "-c", help=CHECKPOINT_HELP)]
Arch = Annotated[Optional[str], typer.Option(help=ARCH_HELP)]
Dataset = Annotated[Optional[str], typer.Option(help=DATASET_HELP)]
Lr = Annotated[Optional[float], typer.Option(help="Peak learning rate" + _default("train", "lr") + ".")]
BatchSize = Annotated[Optional[int], typer.Option(help="Training batch size" + _default("train", "batch_size")
                                                        + ".")]
WeightDecay = Annotated[Optional[float], typer.Option(help="Weight decay" + _default("train", "weight_decay")
                                                             + ".")]
Schedule = Annotated[Optional[str], typer.Option(help="onecycle, cosine or constant"
                                                       + _default("train", "schedule") + ".")]
Distill = Annotated[Optional[str], typer.Option(help=DISTILL_HELP)]
Settings = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Any other field of the stage, as in a recipe (repeat for several): "
    "e.g. --set saliency=magnitude-taylor, --set keep=[conv1,fc], --set distill.method=dkd. `cifarpress stages "
    "STAGE` lists them with their defaults.")]
MaxSteps = Annotated[Optional[int], typer.Option(help="Cap steps per epoch (quick trials).")]
Seed = Annotated[Optional[int], typer.Option(help="Training seed" + _default("train", "seed") + ".")]
DataRoot = Annotated[Optional[Path], typer.Option(help=DATA_ROOT_HELP)]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads for torch training (default: all cores).")]
Force = Annotated[bool, typer.Option(help="Start over instead of resuming after the last finished stage.")]
BenchBatch = Annotated[Optional[list[int]], typer.Option("--bench-batch", "-b", help=BENCH_BATCH_HELP)]
BenchSeconds = Annotated[Optional[float], typer.Option(help=BENCH_SECONDS_HELP)]
BenchThreads = Annotated[Optional[int], typer.Option(help=BENCH_THREADS_HELP)]
# Options of the commands that time exported files (bench, compare)
OnnxBatch = Annotated[list[int], typer.Option("--batch", "-b", help="Batch size (repeat for several).")]
OnnxThreads = Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (default: all cores).")]
MeasureAccuracy = Annotated[bool, typer.Option(help="Also measure test-set top-1.")]


def _recorded_dataset(model: Path, command: str) -> str:
    """The built-in dataset an exported file (its ONNX metadata, or an engine's sidecar) was trained on, whose
    test split measures its accuracy."""
    from cifarpress.datasets import DATASETS

    if model.suffix in (".engine", ".plan"):
        from cifarpress.runtime.tensorrt import read_sidecar

        dataset = read_sidecar(model).get("dataset") if model.is_file() else None
    else:
        from cifarpress.runtime.onnx_file import read_onnx_metadata

        dataset = read_onnx_metadata(model).get("dataset") if model.suffix == ".onnx" and model.is_file() else None
    dataset = dataset or "cifar10"
    if dataset not in DATASETS:
        raise CifarpressError(f"{model} was exported for your own data ({dataset}), whose test images cifarpress "
                              f"does not hold; pass --no-accuracy, or measure it from Python with "
                              f"cifarpress.{command}(..., data=your_loader)")
    return dataset


def _recorded_model(checkpoint: str) -> dict:
    """arch and dataset recorded in a cifarpress model file; {} for anything else (the recipe checks report it)."""
    from cifarpress.model_file import FORMAT, read_checkpoint

    try:
        payload = read_checkpoint(checkpoint)
    except CifarpressError:
        return {}
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return {}
    return {k: payload.get(k) for k in ("arch", "dataset")}


def parse_settings(settings: list[str] | None, command: str) -> dict:
    """`--set a.b=VALUE` pairs as a nested mapping; VALUE is read as YAML (numbers, true, [x, y])."""
    import yaml

    body: dict = {}
    for item in settings or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not all(key.split(".")):
            raise RecipeError(f"cifarpress {command}: --set {item!r}: give KEY=VALUE, e.g. --set channel_multiple=16")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: the string as typed
        *parents, leaf = key.strip().split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"cifarpress {command}: --set {item!r}: {part} is set to a value already")
        node[leaf] = value
    return body


def _run_single_stage(kind: str, values: dict[str, object], option_names: dict[str, str],
                      settings: list[str] | None, *, checkpoint: str,
                      arch: Optional[str], dataset: Optional[str], out_dir: Optional[Path], data_root: Optional[Path],
                      threads: Optional[int], force: bool, bench_batch: Optional[list[int]],
                      bench_seconds: Optional[float], bench_threads: Optional[int]) -> None:
    """Run a recipe of the model, one `kind` stage and an export, and print its report like `compress`.

    `values` maps the stage's fields to the options' values; unset ones (None) keep the stage's defaults. Each
    field's option is --field-name unless `option_names` says otherwise.
    The recipe goes through the same validation and file checks as a recipe file, with messages naming
    the options."""
    import re

    from cifarpress.pipeline.compress import run_recipe

    stage = {field: (option_names.get(field, "--" + field.replace("_", "-")), value) for field, value in values.items()}
    recorded = _recorded_model(checkpoint)
    arch = arch or recorded.get("arch") or "resnet20"
    body = {field: value for field, (_, value) in stage.items() if value is not None}
    if "distill" in body:
        body["distill"] = {"method": body["distill"]}
    extra = parse_settings(settings, kind)
    for key, value in extra.items():  # --set distill.x=... joins --distill's block
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) and isinstance(value, dict) else value
    bench = {"batch_sizes": bench_batch or None, "seconds": bench_seconds, "threads": bench_threads}
    raw = {
        "name": f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', arch)}",
        "dataset": dataset or recorded.get("dataset") or "cifar10",
        "model": {"arch": arch, "checkpoint": checkpoint},
        "stages": [{kind: body}, {"export": {}}],
        "bench": {k: v for k, v in bench.items() if v is not None},
    }
    labels = {"dataset": "--dataset", "model.arch": "--arch", "model.checkpoint": "--checkpoint",
              "bench.batch_sizes": "--bench-batch", "bench.seconds": "--bench-seconds",
              "bench.threads": "--bench-threads", f"stages[0].{kind}": kind}
    labels |= {f"stages[0].{kind}.{field}": f"{option} ({kind}.{field})" for field, (option, _) in stage.items()}
    if "distill" in stage:
        labels[f"stages[0].{kind}.distill.method"] = f"--distill ({kind}.distill.method)"
    labels |= {f"stages[0].{kind}.{key}": f"--set {key} ({kind}.{key})" for key in extra}
    spec = recipe_from_dict(raw, Path.cwd(), f"cifarpress {kind}", labels, relative_to="the current folder")
    set_threads(threads)
    run_dir = run_recipe(spec, out_dir, str(data_root) if data_root else None, force)
    print((run_dir / "report.md").read_text(), end="")
    print(f"report: {run_dir / 'report.json'}")


def stage_command(kind: str):
    """Register `cifarpress KIND`: one recipe stage plus an export, without a recipe file. The decorated
    function declares only the stage's headline options and returns (stage fields, option names for
    messages); every command shares the options below, and `--set` reaches all other fields."""
    import inspect

    shared = {  # name: (annotation, default)
        "checkpoint": (Checkpoint, "builtin:resnet20-cifar10"), "arch": (Arch, None), "dataset": (Dataset, None),
        "epochs": (Annotated[Optional[int], typer.Option(help="Training epochs" + _default(kind, "epochs") + ".")],
                   None),
        "lr": (Lr, None), "batch_size": (BatchSize, None), "weight_decay": (WeightDecay, None),
        "schedule": (Schedule, None), "distill": (Distill, None), "settings": (Settings, None),
        "max_steps_per_epoch": (MaxSteps, None), "seed": (Seed, None),
        "out_dir": (Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Run folder (default "
                                                           f"runs/{kind}-<arch>).")], None),
        "data_root": (DataRoot, None), "threads": (Threads, None), "force": (Force, False),
        "bench_batch": (BenchBatch, None), "bench_seconds": (BenchSeconds, None), "bench_threads": (BenchThreads, None),
    }
    training = ("epochs", "lr", "batch_size", "weight_decay", "schedule", "distill", "max_steps_per_epoch", "seed")

    def decorate(headline):
        own = list(inspect.signature(headline, eval_str=True).parameters.values())

        def command(**options):
            values, option_names = headline(**{p.name: options.pop(p.name) for p in own})
            values |= {name: options.pop(name) for name in training}
            _run_single_stage(kind, values, option_names, options.pop("settings"), **options)

        command.__doc__ = headline.__doc__
        command.__signature__ = inspect.Signature(
            own + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
                   for name, (ann, default) in shared.items()])
        wrapped = user_errors(command)
        wrapped.__signature__ = command.__signature__
        return app.command(kind)(wrapped)

    return decorate


@stage_command("prune")
def prune(
    method: Annotated[Optional[str], typer.Option(help="hesso, dhspg or gating" + _default("prune", "method") + ".")] = None,
    target: Annotated[float, typer.Option(help="Pruning target in (0, 1): with --target-kind sparsity the fraction "
                                               "of prunable channel groups removed, with --target-kind macs the "
                                               "fraction of MACs kept.")] = 0.5,
    target_kind: Annotated[str, typer.Option(help="What --target measures: sparsity or macs.")] = "sparsity",
):
    """Structured pruning of one model (the `prune` recipe stage), then export; writes report.json / report.md.

    Stages go to <out>/00-baseline, 01-prune, 02-export; re-running the same command resumes."""
    if target_kind not in ("sparsity", "macs"):
        raise RecipeError(f"cifarpress prune: --target-kind: '{target_kind}' is not sparsity or macs")
    return {"method": method, target_kind: target}, {target_kind: "--target"}


@stage_command("quantize")
def quantize(
    method: Annotated[Optional[str], typer.Option(help="ternary: BitNet b1.58 weights {-1, 0, +1} x scale; adapt: "
                                                       "AdaPT per-layer fixed point (--set mode=deploy for int8)"
                                                       + _default("quantize", "method") + ".")] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Evaluate and keep an exponential moving average of the "
                                                    "weights.")] = False,
):
    """Quantization-aware training of one model (the `quantize` recipe stage), then export (QDQ ONNX and a
    packed low-bit file); writes report.json / report.md.

    Stages go to <out>/00-baseline, 01-quantize, 02-export; re-running the same command resumes."""
    return {"method": method, "ema": ema or None}, {}


@app.command()
@user_errors
def stages(name: Optional[str] = typer.Argument(None, help="One stage (train, prune, quantize, distill, export); "
                                                          "default: all.")):
    """The fields each recipe stage takes (what `--set KEY=VALUE` sets), with defaults, from the technique catalogue."""
    from cifarpress.pipeline.recipe import stage_schemas

    schemas = stage_schemas()
    if name is not None and name not in schemas:
        raise CifarpressError(f"unknown stage '{name}'; choose one of: {', '.join(schemas)}")
    for kind, classes in schemas.items():
        if name not in (None, kind):
            continue
        for method, cls in classes.items():
            out.print(f"[bold]{kind}[/]" + (f" (method: {method})" if method else ""))
            for field, info in cls.model_fields.items():
                default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
                out.print(f"  {field} = {escape(default)}" + (f"  [dim]{escape(info.description)}[/]"
                                                               if info.description else ""), soft_wrap=True)


@app.command()
@user_errors
def export(
    checkpoint: str = typer.Argument(..., help="Model file (.pt) or builtin:NAME; or, with --format tensorrt, "
                                                  "an exported .onnx (e.g. an int8 QDQ file)."),
    output: Path = typer.Option(None, "--output", "-o", help="File to write (default: next to the model)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx, or tensorrt (builds an engine from the ONNX; needs an NVIDIA GPU)."),
    precision: Optional[str] = typer.Option(
        None, help="ONNX: fp32 (default) or int8 (post-training quantization to a TensorRT-ready QDQ graph, "
                   "calibrated on training images). TensorRT: fp32, fp16 (default) or int8 (explicit, from Q/DQ "
                   "scales: the model's own if it is quantized, else the int8 ONNX export's calibration)."),
    max_batch: int = typer.Option(256, min=1, help="TensorRT: largest batch of the optimization profile."),
    calib_images: int = typer.Option(1024, min=10, help="int8: class-balanced training images for calibration."),
    calibrator: str = typer.Option("entropy", help="int8 calibration: minmax, percentile, entropy or mse."),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    check_images: int = typer.Option(1000, min=10, help="Real test images compared between PyTorch and onnxruntime."),
    tolerance: Optional[float] = typer.Option(
        None, help="Max logit difference before the export counts as failed, relative: times max(1, the largest "
                   "|logit|) (default 1e-4; for a quantized model with int8 activations, 2% of the largest logit)."),
    arch: Optional[str] = typer.Option(None, help="Architecture, for a plain state-dict checkpoint."),
    max_drop: Optional[float] = typer.Option(
        None, min=0.0, help="int8: fail when top-1 drops more than this many pp against the float model on the "
                            "check images (the graph's own math), naming the layers that lose most."),
    exclude: list[str] = typer.Option(
        [], help="int8: keep this layer in float: an op type (Conv, Gemm, Add), a layer name (layer1.0.conv1, fc) "
                 "or a module prefix (layer3). Repeat for several."),
    sensitivity: bool = typer.Option(
        False, help="int8: also rank every layer by the top-1 lost when it alone is quantized "
                    "(writes MODEL.int8.sensitivity.json)."),
):
    """Export to ONNX (inputs float32 NCHW RGB in [0, 1], normalization inside), checked in onnxruntime;
    optionally build a TensorRT engine from it with a JSON sidecar."""
    from cifarpress.pipeline.export_file import export_file

    export_file(checkpoint, output, fmt, precision, max_batch, calib_images, calibrator, data_root, check_images,
                tolerance, arch, max_drop, list(exclude), sensitivity, say=lambda x: out.print(x, soft_wrap=True))


@app.command()
@user_errors
def bench(
    model: Path = typer.Argument(..., help="ONNX file (CPU, onnxruntime) or TensorRT .engine (GPU, Jetson)."),
    batch: OnnxBatch = [1, 64],
    device: str = typer.Option("cpu", help="cpu (onnxruntime), gpu (TensorRT engine) or jetson (TensorRT + tegrastats)."),
    threads: OnnxThreads = None,
    seconds: float = typer.Option(3.0, help="Timing budget per batch size (CPU)."),
    iters: int = typer.Option(200, min=10, help="Timed iterations per batch size (GPU)."),
    accuracy: MeasureAccuracy = True,
    data_root: DataRoot = None,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result here (default: MODEL.bench.json)."),
):
    """Latency p50/p90/p99, throughput, peak memory, size and top-1 of an exported model on the target."""
    from cifarpress.pipeline.api import DEVICES
    from cifarpress.pipeline.api import bench as bench_model
    from cifarpress.utils.io import atomic_write_json

    if device not in DEVICES:  # the options in the command's words (api.bench checks them again)
        raise CifarpressError(f"unknown --device '{device}'; use {', '.join(DEVICES)}")
    if device == "cpu" and model.suffix in (".engine", ".plan"):
        raise CifarpressError(f"{model} is a TensorRT engine; bench it with --device gpu or --device jetson")
    target = check_writable(json_out or model.with_suffix(".bench.json"))  # before measuring, not after
    test = _recorded_dataset(model, "bench") if accuracy else None
    result = bench_model(model, test, batch_sizes=batch, threads=threads, seconds=seconds, device=device,
                         iters=iters, data_root=data_root)
    if device == "cpu":
        from cifarpress.runtime.tables import bench_table

        out.print(bench_table(result))
    else:
        out.print_json(json.dumps(result))
    atomic_write_json(target, result)
    out.print(f"wrote {target}")


@app.command()
@user_errors
def lower(
    model: Path = typer.Argument(..., help="A QDQ ONNX file (int8 or ternary export)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write (default: MODEL.ort.onnx)."),
    reduce_range: Optional[bool] = typer.Option(
        None, "--reduce-range/--full-range",
        help="Requantize integer-kernel weights to 7 bits, for CPUs without VNNI (AVX2 only), whose int8 kernels "
             "saturate 8-bit weights (default: what this CPU needs)."),
):
    """Write the graph cifarpress runs in onnxruntime (int8 ReLU and ReLU6 chains folded into uint8, duplicate
    quantizations merged, weight-only quantized layers' weights dequantized), for deploying with plain onnxruntime
    on a CPU; TensorRT takes the original."""
    from cifarpress.runtime.onnx_file import read_onnx_metadata
    from cifarpress.runtime.ort_lowering import lower_file
    from cifarpress.utils.io import atomic_write

    read_onnx_metadata(model)  # a missing or unreadable file, in words
    data, counts = lower_file(model, reduce_range)
    if data is None:
        raise CifarpressError(f"{model} has nothing to lower for onnxruntime (a float graph runs as it is)")
    target = output or model.with_name(f"{model.stem}.ort.onnx")
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    out.print(f"{target}: {len(data) / 1e6:.2f} MB for onnxruntime CPU ({counts['relu_chains']} ReLU chains folded "
              f"into uint8, {counts['clip_chains']} ReLU6 Clips folded into uint8, {counts['merged_quantize']} "
              f"duplicate QuantizeLinears merged, {counts['weights']} weights dequantized"
              + (f", {counts['weights_7bit']} weights in 7-bit range for CPUs without VNNI" if counts["weights_7bit"]
                 else "") + "); "
              f"build TensorRT engines from {model}")


@app.command()
@user_errors
def compare(
    models: list[Path] = typer.Argument(..., help="Two or more ONNX files; the first is the reference of the ratios."),
    batch: OnnxBatch = [1, 64],
    threads: OnnxThreads = None,
    seconds: float = typer.Option(3.0, help="Timing budget per batch size, file and round."),
    rounds: int = typer.Option(3, min=1, help="Rounds; each times every file once, in turn; medians are reported."),
    accuracy: MeasureAccuracy = True,
    data_root: DataRoot = None,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result here as JSON."),
):
    """Several exported models side by side on this CPU: latency (timed in turn, so machine noise hits all
    alike), size and top-1, with ratios against the first."""
    from cifarpress.pipeline.api import compare as compare_models
    from cifarpress.runtime.tables import compare_table
    from cifarpress.utils.io import atomic_write_json

    if len(models) < 2:
        raise CifarpressError("compare needs two or more ONNX files (the first is the reference); "
                              "for one file use `cifarpress bench`")
    if json_out:
        check_writable(json_out)  # before minutes of timing, not after
    test = None
    if accuracy:
        datasets = {_recorded_dataset(p, "compare") for p in models}
        if len(datasets) > 1:
            raise CifarpressError(f"the files were trained on different datasets ({', '.join(sorted(datasets))}); "
                                  f"compare models of one dataset, or pass --no-accuracy")
        test = datasets.pop()
    result = compare_models(models, test, batch_sizes=batch, threads=threads, seconds=seconds, rounds=rounds,
                            data_root=data_root)
    out.print(compare_table(result))
    if json_out:
        atomic_write_json(json_out, result)
        out.print(f"wrote {json_out}")


@app.command()
@user_errors
def inspect(
    model: Optional[str] = typer.Argument(None, help="Zoo name, package.module:factory, or a model file (.pt)."),
    num_classes: int = typer.Option(10, help="Classes, when building from a name."),
    list_models: bool = typer.Option(False, "--list", help="List the zoo."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Parameters and MACs per layer (MACs of conv and linear layers, one 32x32 image)."""
    from cifarpress.model_file import load_model
    from cifarpress.models import MODELS, build_model
    from cifarpress.profile import profile_model, render_profile

    if list_models or model is None:
        for name in MODELS:
            out.print(name)
        return
    if model.endswith(".pt") or model.startswith("builtin:"):
        net, _ = load_model(model)
    else:
        net = build_model(model, num_classes)
    prof = profile_model(net)
    if as_json:
        out.print_json(json.dumps(prof.to_dict()))
    else:
        out.print(render_profile(prof, title=model))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
