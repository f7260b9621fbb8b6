"""The Python API: every stage as one function on your own model and data (`from cifarpress import prune`).

Each function takes a torch model, then its data, then a config: the catalogue's pydantic config of the
stage (cifarpress.techniques), a dict, or keyword arguments that build one, checked as a recipe's stage is.
Training stages return the model they trained (as torch_pruning, torchao and modelopt hand back the model
they changed); `export` returns the file with its checks, `bench` and `compare` their measurements.

Data is what you already have: a `torch.utils.data.DataLoader`, or any re-iterable of `(images, labels)`
batches, whose images are the model's inputs as they are (your transforms, normalization and batch size);
or a built-in dataset name ("cifar10", "cifar100") for the fast in-memory CIFAR splits. Calibration takes
batches of images (labels optional) or a `forward_loop(model)` callable that runs the model on them. The
input shape comes from the data (`input_shape=` where there is none), so a 3x64x64 model is traced, pruned,
exported, calibrated and benched at 64x64.

The command line and recipes call these same functions (`run_stage` for any training stage, `export`,
`bench`, `compare`); what they add is reading model files and writing run folders.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import torch
from pydantic import BaseModel, Field, ValidationError, create_model
from torch import nn

from cifarpress.data import (
    DATASETS,
    CifarSplit,
    DatasetSpec,
    batch_pair,
    check_classes,
    check_reiterable,
    custom_spec,
    input_shape_of,
    load_split,
)
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import ExportCheck
from cifarpress.model_file import load_model
from cifarpress.pipeline.recipe import (
    STAGE_CLASSES,
    DistillStage,
    TrainStage,
    applied_in,
    format_validation_error,
    stage_body,
)
from cifarpress.techniques import StageContext
from cifarpress.train.options import TrainingOptions
from cifarpress.train.trainer import Plugin, TrainConfig, Trainer, TrainResult
from cifarpress.train.trainer import evaluate as _evaluate_torch

# What the data arguments take (see the module docstring).
Data = Union[str, CifarSplit, Iterable]
Calibration = Union[str, CifarSplit, Iterable, Callable[[nn.Module], Any]]

_ENTERING = "<the model entering the stage>"  # the default distillation teacher, as in a recipe
_GIVEN_TEACHER = "<the teacher passed in>"


# -- data ------------------------------------------------------------------------------------

def _resolve(data, split: str, data_root, what: str):
    """A dataset name as its built-in split; a split or a user's batches as they are."""
    if isinstance(data, str):
        if data not in DATASETS:
            raise CifarpressError(f"{what}: unknown dataset '{data}'; give one of {', '.join(DATASETS)}, a "
                                  f"DataLoader or an iterable of (images, labels) batches")
        return load_split(data, split, data_root)
    if isinstance(data, (CifarSplit, type(None))):
        return data
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise CifarpressError(f"{what} is a {type(data).__name__}; give a DataLoader, an iterable of (images, labels) "
                              f"batches, or a dataset name ({', '.join(DATASETS)})")
    check_reiterable(data, what)
    return data


def _output_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The model's class count, from one forward pass on a probe of the data's shape."""
    first = next(model.parameters(), None)
    probe = torch.zeros(2, *input_shape, device=first.device if first is not None else "cpu")
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(probe)
    except Exception as exc:
        raise CifarpressError(f"the model fails on inputs of shape {tuple(probe.shape)} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); give data (or input_shape=) "
                              f"of the shape it takes") from None
    finally:
        model.train(was_training)
    if logits.dim() != 2:
        raise CifarpressError(f"the model returns shape {tuple(logits.shape)}, not (batch, classes) logits")
    return int(logits.shape[1])


# -- training stages ---------------------------------------------------------------------------

# `distill(student, teacher, ...)`: a recipe's distill stage without its `arch` (the student is given).
_DistillBody = create_model("DistillBody", __base__=DistillStage, arch=(Optional[str], Field(None)))


def _schemas(kind: str) -> tuple[type, ...]:
    if kind == "train":
        return (TrainStage,)
    if kind == "distill":
        return (DistillStage,)
    if kind in STAGE_CLASSES:
        return tuple(STAGE_CLASSES[kind].values())
    raise CifarpressError(f"unknown stage '{kind}'; choose one of: train, {', '.join(STAGE_CLASSES)}, distill")


def _addon(value, name: str):
    """`ema=True`, `mesa=True` / `distill=True` (defaults), False/None (off), or a config or a dict."""
    if value is True:
        return True if name == "ema" else {}
    if value is False:
        return False if name == "ema" else None
    return value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value


def stage_config(kind: str, config=None, **options) -> BaseModel:
    """The validated body of a training stage, as a recipe stage `- KIND: {...}` holds it: the training options,
    the stage technique's config and any add-ons (distill, ema, mesa). `config` is the technique's pydantic
    config (HessoConfig(macs=0.5)), a stage body, or a dict; keyword options are merged over it.
    A bad value is one CifarpressError naming the field.

        stage_config("prune", method="hesso", macs=0.5, epochs=10, distill={"method": "kd"})
    """
    schemas = _schemas(kind)
    if isinstance(config, schemas) and not options:
        return config  # a recipe's stage body, validated already
    if config is None:
        values = {}
    elif isinstance(config, BaseModel):
        values = config.model_dump(exclude_unset=True)
        if "method" in type(config).model_fields:
            values["method"] = config.method  # a default method is still the chosen one
    elif isinstance(config, dict):
        values = dict(config)
    else:
        raise CifarpressError(f"{kind}: config is a {type(config).__name__}; give the stage's pydantic config, a "
                              f"dict, or keyword arguments")
    values |= options
    for name in ("distill", "ema", "mesa"):
        if name in values:
            values[name] = _addon(values[name], name)
    if kind == "distill" and isinstance(values.get("distill"), type(None)):
        values.pop("distill")
    try:
        if kind == "train":
            return TrainStage(**values)
        if kind == "distill":
            return _DistillBody(**values)
        return stage_body(kind, **values)
    except ValidationError as exc:
        lines = format_validation_error(exc, f"cifarpress.{kind}()").splitlines()
        raise CifarpressError("; ".join(lines)) from None


def stage_plugins(kind: str, body, num_classes: int, entering_model: str | Path,
                  load: Callable[[str], tuple] = load_model) -> list[Plugin]:
    """The plug-ins a training stage asks for, built through the catalogue: its own technique (if the stage
    is one) and every add-on it sets, in phase order (train.phases: reshape, quantize, loss, average, memory).
    `load` reads a teacher named in the body (model_file.load_model: a path or builtin:NAME)."""
    context = StageContext(num_classes, str(entering_model), load)
    ordered = sorted(applied_in(kind, body), key=lambda item: item[0].phase)  # stable: ties keep catalogue order
    return [plugin for technique, config in ordered if (plugin := technique.build(config, context)) is not None]


def train_config(body: TrainingOptions) -> TrainConfig:
    """The Trainer's settings of a stage body (its training options; the loop's own defaults for the rest)."""
    return TrainConfig(**body.training_options())


def _phase_order(plugin: Plugin) -> tuple[bool, int]:
    return plugin.phase is None, plugin.phase or 0


def run_stage(kind: str, model: Union[nn.Module, str, Path], data: Data, config=None, *, test: Optional[Data] = None,
              teacher: Union[nn.Module, str, None] = None, plugins: Sequence[Plugin] = (),
              out: Union[str, Path, None] = None, device: Union[str, torch.device, None] = None,
              quiet: bool = False, data_root: Union[str, Path, None] = None, **options) -> TrainResult:
    """Run any training stage by its recipe name (train, prune, quantize, distill) and return the Trainer's
    result: the model handed on (`.model`), its final top-1 on `test` (`.top1`, NaN without test data) and the
    per-epoch metrics (`.history`). `train`, `prune`, `quantize` and `distill` are this with the stage named.

    data: the training data (module docstring); test: evaluated after every epoch (default: the built-in test
    split when data is a dataset name, else none). teacher: the distillation teacher (a model, a model file or
    builtin:NAME) when the stage carries `distill`; default the model as it enters the stage. plugins: your
    own train.Plugin objects, run in phase order with the stage's. out: a run folder for last.pt after every
    epoch; running again with the same arguments resumes after the last finished epoch.

        result = run_stage("prune", model, loader, macs=0.5, epochs=10)
        print(result.top1, result.model)
    """
    if isinstance(model, (str, Path)):  # a model file or builtin:NAME, as a recipe's model.checkpoint
        model = load_model(model)[0]
    elif not isinstance(model, nn.Module):
        raise CifarpressError(f"cifarpress.{kind}(): the model is a {type(model).__name__}; give a torch model, "
                              f"a model file or builtin:NAME")
    if "distill" in options:  # distill={"teacher": a torch model, ...}: the model goes in as the teacher
        options["distill"], given = _teacher_in(options["distill"])
        teacher = given if given is not None else teacher
    body = stage_config(kind, config, **options)
    train = _resolve(data, "train", data_root, "data")
    if train is None:
        raise CifarpressError(f"cifarpress.{kind}(): give training data (a DataLoader, an iterable of (images, "
                              f"labels) batches, or a dataset name)")
    if test is None and isinstance(data, str):
        test = data
    test = _resolve(test, "test", data_root, "test")
    input_shape = input_shape_of(train, "data")
    num_classes = train.spec.num_classes if isinstance(train, CifarSplit) else _output_classes(model, input_shape)
    if isinstance(train, CifarSplit):
        check_classes(_output_classes(model, input_shape), train)

    def load(spec: str) -> tuple:
        """A teacher the stage names: the entering model, the teacher passed in, or a model file."""
        if spec == _ENTERING:
            return copy.deepcopy(model), {"num_classes": num_classes}
        if spec == _GIVEN_TEACHER:
            return teacher, {"num_classes": num_classes}  # a mismatch is caught at the first step
        return load_model(spec)

    if isinstance(teacher, (str, Path)):
        entering = str(teacher)
    elif isinstance(teacher, nn.Module):
        entering = _GIVEN_TEACHER
    elif teacher is None:
        entering = _ENTERING
    else:
        raise CifarpressError(f"teacher is a {type(teacher).__name__}; give a torch model, a model file or "
                              f"builtin:NAME")
    built = stage_plugins(kind, body, num_classes, entering, load)
    ordered = sorted([*built, *plugins], key=_phase_order)
    trainer = Trainer(model, train_config(body), ordered, run_dir=out, device=torch.device(device) if device
                      else None, quiet=quiet)
    return trainer.fit(train, test)


def _teacher_in(value) -> tuple[Any, Optional[nn.Module]]:
    """A `distill=` add-on whose teacher is a torch model: (the add-on without it, that model)."""
    if isinstance(value, dict) and isinstance(value.get("teacher"), nn.Module):
        return {k: v for k, v in value.items() if k != "teacher"}, value["teacher"]
    return value, None


def _stage(kind: str, model, data, config, options: dict) -> nn.Module:
    return run_stage(kind, model, data, config, **options).model


def train(model: nn.Module, data: Data, config=None, *, test: Optional[Data] = None, distill=None,
          ema: bool = False, mesa=None, out: Union[str, Path, None] = None, **options) -> nn.Module:
    """Train or fine-tune `model` on `data` and return it (a recipe's `train` stage).

    config / options: TrainingOptions fields (epochs, lr, batch_size for a built-in dataset, schedule,
    weight_decay, label_smoothing, max_steps_per_epoch, seed; fine-tuning defaults: 1 epoch at lr 0.01,
    cosine). Add-ons as in recipes: distill={"method": "kd", "teacher": teacher_model} (default teacher: the
    model as it enters), ema=True, mesa=True (or their configs). See run_stage for test, out, device, quiet.

        model = cifarpress.train(model, loader, epochs=5, lr=0.05, ema=True)
    """
    return _stage("train", model, data, config, dict(test=test, distill=distill, ema=ema, mesa=mesa, out=out,
                                                      **options))


def prune(model: nn.Module, data: Data, config=None, *, test: Optional[Data] = None, distill=None,
          ema: bool = False, mesa=None, out: Union[str, Path, None] = None, **options) -> nn.Module:
    """Structured pruning while training on `data`; returns the smaller model with the pruned channels cut out.

    config: HessoConfig, DhspgConfig or GatingConfig (or method="hesso" | "dhspg" | "gating" with their
    fields as keywords); exactly one target: macs= (fraction of MACs kept) or sparsity= (fraction of channel
    groups removed). Training options and add-ons as for `train` (defaults: 10 epochs at lr 0.01).

        small = cifarpress.prune(model, loader, macs=0.5, epochs=10, distill={"method": "kd"})
    """
    return _stage("prune", model, data, config, dict(test=test, distill=distill, ema=ema, mesa=mesa, out=out,
                                                      **options))


def quantize(model: nn.Module, data: Data, config=None, *, test: Optional[Data] = None, distill=None,
             ema: bool = False, mesa=None, out: Union[str, Path, None] = None, **options) -> nn.Module:
    """Quantization-aware training on `data`; returns the fake-quantized model (`export` writes its QDQ graph
    and packed low-bit file). For post-training int8 of a float model, use export(precision="int8").

    config: a quantize method's config from the catalogue (TernaryQuantConfig; method="ternary" and its
    fields as keywords, e.g. act_bits=8). Training options and add-ons as for `train` (default 5 epochs).

        q = cifarpress.quantize(model, loader, method="ternary", epochs=5, distill={"method": "kd"})
    """
    return _stage("quantize", model, data, config, dict(test=test, distill=distill, ema=ema, mesa=mesa, out=out,
                                                         **options))


def distill(model: nn.Module, teacher: Union[nn.Module, str], data: Data, config=None, *,
            test: Optional[Data] = None, ema: bool = False, mesa=None, out: Union[str, Path, None] = None,
            **options) -> nn.Module:
    """Train the student `model` from `teacher` (a torch model, a model file or builtin:NAME) on `data`; returns
    the student (a recipe's `distill` stage).

    config: DistillConfig (method "kd" | "dkd" | "nkd", weight, temperature, ...) or a dict of it. Options:
    training options (defaults: 30 epochs at lr 0.1) and the ema / mesa add-ons.

        student = cifarpress.distill(small_net, big_net, loader, {"method": "dkd"}, epochs=30)
    """
    if isinstance(config, dict) and isinstance(config.get("teacher"), nn.Module):
        raise CifarpressError("cifarpress.distill(): pass the teacher as the second argument, not in config")
    body = dict(options, distill=config if config is not None else {}, ema=ema, mesa=mesa)
    return run_stage("distill", model, data, None, test=test, teacher=teacher, out=out, **body).model


def evaluate(model: Union[nn.Module, str, Path], data: Data, *, data_root: Union[str, Path, None] = None,
             threads: Optional[int] = None) -> float:
    """Top-1 accuracy (%) of a torch model, or of an exported .onnx file (onnxruntime on this CPU), on `data`
    (a built-in dataset name means its test split).

        cifarpress.evaluate(model, test_loader)   # 91.3
    """
    test = _resolve(data, "test", data_root, "data")
    if test is None:
        raise CifarpressError("cifarpress.evaluate(): give the data to evaluate on")
    if isinstance(model, (str, Path)):
        from cifarpress.runtime.ort import onnx_accuracy

        return onnx_accuracy(_existing_onnx(model), test, threads)
    return _evaluate_torch(model, test)


# -- export ----------------------------------------------------------------------------------------

@dataclass
class Exported:
    """What `export` wrote and how it checked. `path` is the deployable file (the .onnx, or the TensorRT
    .engine); `onnx` the ONNX file it came from; `check` onnxruntime on this CPU against the PyTorch model
    (for an int8 file: no tolerance, the agreement is recorded); `graph_check` the int8 graph's own math
    (what TensorRT builds) against it; `top1_drop_pp` the top-1 int8 lost on the check images."""

    path: Path
    format: str
    precision: str
    onnx: Path
    check: Optional[ExportCheck]
    graph_check: Optional[ExportCheck] = None
    top1_drop_pp: Optional[float] = None
    violations: list[str] = field(default_factory=list)  # of TensorRT's explicit-quantization rules
    manifest: Optional[dict] = None  # the int8 calibration draw
    packed: Optional[Path] = None  # a quantized model's packed low-bit file
    engine: Optional[Path] = None

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "precision": self.precision, "bytes": self.bytes,
                "onnx": str(self.onnx), "check": self.check.to_dict() if self.check else None,
                "graph_check": self.graph_check.to_dict() if self.graph_check else None,
                "top1_drop_pp": self.top1_drop_pp, "violations": self.violations,
                "calib_images": self.manifest["count"] if self.manifest else None,
                "packed": str(self.packed) if self.packed else None, "engine": str(self.engine) if self.engine else None}


def _is_forward_loop(data) -> bool:
    """A `forward_loop(model)` callable (modelopt's convention), rather than batches to iterate."""
    return callable(data) and not hasattr(data, "__iter__")


class _Recorder(nn.Module):
    """Keeps the inputs a forward_loop feeds the model, up to `limit` images, and runs the model on them."""

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.inputs, self.count = model, limit, [], 0

    def forward(self, x, *args, **kwargs):
        if self.count < self.limit:
            self.inputs.append(x.detach().cpu()[: self.limit - self.count])
            self.count += len(self.inputs[-1])
        return self.model(x, *args, **kwargs)


def _collect(data, count: int, what: str, model: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `count` (model inputs, labels) from a user's batches (labels -1 where batches hold images only),
    or from a forward_loop(model) callable run on `model`."""
    images, labels, total = [], [], 0
    if _is_forward_loop(data):
        if model is None:
            raise CifarpressError(f"{what}: a forward_loop needs a torch model to run; give batches of images")
        recorder = _Recorder(model, count)
        was_training = model.training
        try:
            with torch.no_grad():
                data(recorder.eval())
        finally:
            model.train(was_training)
        images = recorder.inputs
        labels = [torch.full((len(x),), -1, dtype=torch.int64) for x in images]
    else:
        for batch in data:
            if isinstance(batch, torch.Tensor):
                x, y = batch, torch.full((len(batch),), -1, dtype=torch.int64)
            else:
                x, y = batch_pair(batch, what)
            take = min(len(x), count - total)
            images.append(x[:take].detach().cpu().float())
            labels.append(y[:take].detach().cpu().long())
            total += take
            if total >= count:
                break
    if not images or sum(len(x) for x in images) == 0:
        raise CifarpressError(f"{what} yields no images")
    return torch.cat(images), torch.cat(labels)


def _sample(data, spec: DatasetSpec, count: int, what: str, model: Optional[nn.Module] = None) -> CifarSplit:
    """A user's data (or forward_loop) as an in-memory sample of `count` images, held as the graph takes them
    (x * std + mean of the model's inputs where the graph normalizes inside)."""
    from cifarpress.runtime.inputs import graph_inputs

    x, y = _collect(data, count, what, model)
    if tuple(x.shape[1:]) != spec.input_shape:
        raise CifarpressError(f"{what} holds images of shape {tuple(x.shape[1:])}, but the export is for "
                              f"{spec.input_shape}; give data of one shape (or the matching input_shape=)")
    shape = (1, -1, 1, 1)
    normalization = ((torch.tensor(spec.mean).view(shape).numpy(), torch.tensor(spec.std).view(shape).numpy())
                     if spec.normalizes else None)
    pixels = torch.from_numpy(graph_inputs(x, normalization))
    classes = [str(c) for c in range(spec.num_classes)]
    return CifarSplit(pixels, y, classes, spec, f"{len(y)} images of the data given")


def _random_sample(spec: DatasetSpec, count: int) -> CifarSplit:
    """Check images when no data is given: uniform random inputs of the export's shape (a fixed draw)."""
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(count, *spec.input_shape, generator=gen)
    return CifarSplit(pixels, torch.full((count,), -1, dtype=torch.int64), [str(c) for c in range(spec.num_classes)],
                      spec, f"{count} random inputs")


def _shape_of(data, what: str) -> Optional[tuple[int, ...]]:
    if data is None or _is_forward_loop(data):
        return None
    if isinstance(data, CifarSplit):
        return tuple(data.images.shape[1:])
    for batch in data:
        x = batch if isinstance(batch, torch.Tensor) else batch_pair(batch, what)[0]
        return tuple(x.shape[1:])
    raise CifarpressError(f"{what} yields no batches")


def _export_data(model: nn.Module, data, calibration, input_shape, normalization, classes, check_images: int,
                 calib_images: int, int8: bool, data_root) -> tuple[DatasetSpec, CifarSplit, Optional[CifarSplit]]:
    """(spec, check images, calibration images) of an export from what the caller gave."""
    test = _resolve(data, "test", data_root, "data")
    if calibration is None and isinstance(data, str):
        calibration = data  # a built-in dataset calibrates on its training split, as recipes do
    calib = calibration if _is_forward_loop(calibration) else _resolve(calibration, "train", data_root, "calibration")
    builtin = next((d for d in (test, calib) if isinstance(d, CifarSplit) and d.spec.name in DATASETS
                    and d.images.dtype == torch.uint8), None)
    shapes = {s for s in (_shape_of(test, "data"), _shape_of(calib, "calibration")) if s is not None}
    if input_shape is not None:
        shapes.add(tuple(int(d) for d in input_shape))
    if len(shapes) > 1:
        raise CifarpressError(f"the data, calibration and input_shape disagree on the input shape "
                              f"({', '.join(map(str, sorted(shapes)))}); give them one shape")
    shape = shapes.pop() if shapes else (3, 32, 32)
    if builtin is not None:
        if normalization is not None:
            raise CifarpressError("normalization= applies to your own data; a built-in dataset brings its own")
        spec = builtin.spec
        check_classes(_output_classes(model, shape), builtin)
    else:
        mean, std = normalization if normalization is not None else (None, None)
        spec = custom_spec(_output_classes(model, shape), shape, mean, std)
    if classes is not None:
        if len(classes) != spec.num_classes:
            raise CifarpressError(f"classes names {len(classes)} classes, the model has {spec.num_classes} outputs")
    if isinstance(test, CifarSplit):
        check = test
    elif test is not None:
        check = _sample(test, spec, check_images, "data", model)
    elif calib is not None and not int8:
        check = _sample(calib, spec, check_images, "calibration", model)
    else:
        check = _random_sample(spec, min(check_images, 256))
    if classes is not None:
        check = CifarSplit(check.images, check.labels, list(classes), check.spec, check.source)
    calib_split = None
    if int8:
        if calib is None:
            raise CifarpressError("int8 export needs calibration images: pass calibration= (a DataLoader, batches "
                                  "of images or a forward_loop) or a built-in dataset name as data")
        calib_split = calib if isinstance(calib, CifarSplit) else _sample(calib, spec, calib_images, "calibration",
                                                                           model)
    return spec, check, calib_split


def _existing_onnx(path) -> Path:
    from cifarpress.runtime.onnx_file import read_onnx_metadata

    path = Path(path)
    read_onnx_metadata(path)  # a missing or unreadable file, in words
    return path


def _engine_path(onnx_path: Path, precision: str) -> Path:
    # m.onnx -> m.int8.engine, and m.int8.onnx -> m.int8.engine too
    name = onnx_path.stem if onnx_path.stem.endswith(f".{precision}") else f"{onnx_path.stem}.{precision}"
    return onnx_path.with_name(f"{name}.engine")


def export_precision(format: str, precision: Optional[str], int8_options: Optional[str] = None,
                     flag: Callable[[str], str] = lambda name: name) -> str:
    """The precision an export of `format` gets (fp32 for ONNX, fp16 for TensorRT when None), or one line naming
    the mistake: an unknown format, a precision the format lacks, or int8-only options (`int8_options`, their
    names as the caller's user knows them) without int8. `flag` spells a parameter as the caller's user knows
    it (the CLI: "--format")."""
    if format not in ("onnx", "tensorrt"):
        raise CifarpressError(f"unknown {flag('format')} '{format}'; use onnx or tensorrt")
    precision = precision or ("fp32" if format == "onnx" else "fp16")
    allowed = ("fp32", "int8") if format == "onnx" else ("fp32", "fp16", "int8")
    if precision not in allowed:
        raise CifarpressError(f"{flag('precision')} {precision} is not available for {flag('format')} {format}; "
                              f"use one of {', '.join(allowed)}")
    if precision != "int8" and int8_options:
        raise CifarpressError(f"{int8_options} apply to {flag('precision')} int8 only")
    return precision


def export(model: Union[nn.Module, str, Path], path: Union[str, Path, None] = None, *,
           format: Literal["onnx", "tensorrt"] = "onnx", precision: Optional[str] = None,
           data: Optional[Data] = None, calibration: Optional[Calibration] = None,
           input_shape: Optional[Sequence[int]] = None, normalization: Optional[tuple] = None,
           classes: Optional[Sequence[str]] = None, check_images: int = 1000, calib_images: int = 1024,
           calibrator: Optional[str] = None, tolerance: Optional[float] = None, max_drop: Optional[float] = None,
           exclude: Sequence[str] = (), max_batch: int = 256, opt_batch: Optional[int] = None,
           engine: Union[str, Path, None] = None, threads: Optional[int] = None,
           metadata: Optional[dict] = None, data_root: Union[str, Path, None] = None) -> Exported:
    """Export `model` to `path` as ONNX, checked in onnxruntime against PyTorch before the file is put in place,
    and optionally build a TensorRT engine from it. `model` may also be a float cifarpress .onnx file (to
    quantize it to int8, or to build an engine); `path` is then the int8 file (default MODEL.int8.onnx).

    precision: fp32 (default for onnx), int8 (post-training quantization to a TensorRT-ready QDQ graph), or for
    tensorrt fp16 (its default). A model from `quantize` exports its own QDQ graph plus a packed low-bit file
    (path with .packed). data: check images (default: 256 random inputs of input_shape; labelled data also
    gives int8's top-1 drop). calibration: int8's images: a DataLoader, batches of images, a forward_loop(model),
    or a dataset name (default: data's training split when data names one). normalization: (mean, std) per
    channel that your transform applied: the graph then takes pixels in [0, 1] and normalizes inside; without
    it the graph takes the model's inputs as they are. input_shape: (C, H, W) when there is no data.
    calibrator (minmax | percentile | entropy | mse; default entropy, and minmax for an AdaPT deploy-mode model,
    whose int8 inputs trained on absmax ranges), max_drop (fail above this many pp lost), exclude (layers
    kept in float): int8 only. engine: the TensorRT engine's path (default beside the ONNX).

        out = cifarpress.export(model, "model.int8.onnx", precision="int8", data=test_loader,
                                calibration=train_loader)
        out.check.top1_agreement, out.top1_drop_pp
    """
    from cifarpress.export import api as exports
    from cifarpress.export.calibrate import CALIBRATORS, DEFAULT_CALIBRATOR

    precision = export_precision(format, precision, "max_drop and exclude" if exclude or max_drop is not None
                                 else None)
    if precision == "int8":
        if calibrator is not None and calibrator not in CALIBRATORS:  # before any data is read
            raise CifarpressError(f"unknown calibrator '{calibrator}'; choose one of {', '.join(CALIBRATORS)}")
    if format == "tensorrt":
        from cifarpress.runtime.tensorrt import require_tensorrt

        require_tensorrt()  # one sentence on a machine without TensorRT or a GPU, before any work
    if isinstance(model, (str, Path)):
        exported = _export_onnx_file(Path(model), path, format, precision, data, calibration, check_images,
                                     calib_images, calibrator or DEFAULT_CALIBRATOR, max_drop, exclude, threads,
                                     data_root)
    elif isinstance(model, nn.Module):
        if path is None:
            raise CifarpressError("cifarpress.export(): give the path of the ONNX file to write")
        path = Path(path)
        quantized = exports.is_fake_quantized(model)
        if precision == "int8" and quantized and format == "onnx":
            raise CifarpressError("the model is already quantized (a quantize stage); export it without "
                                  "precision int8: its QDQ graph is int8 already")
        int8 = precision == "int8" and not quantized
        from cifarpress.export.fixed_point import is_fixed_point_int8

        # AdaPT deploy mode: the int8 engine the int8 export writes, with the model's own codes (fixed_point.py)
        fixed_int8 = quantized and is_fixed_point_int8(model)
        spec, check, calib = _export_data(model, data, calibration, input_shape, normalization, classes,
                                          check_images, calib_images, int8 or fixed_int8, data_root)
        meta = dict(metadata or {})
        if fixed_int8:
            from cifarpress.export.fixed_point import export_fixed_point_int8_checked

            labelled = int(check.labels.min()) >= 0
            done = export_fixed_point_int8_checked(model, path, calib, check, calibrator, calib_images, check_images,
                                                   extra_metadata=meta, threads=threads, max_drop=max_drop)
            packed = exports.side_files(model, path.with_suffix(".packed"), meta.get("arch", type(model).__name__),
                                        spec.num_classes, spec.name)
            exported = Exported(done.path, "onnx", "quantized", done.path, done.check, done.graph_check,
                                done.top1_drop_pp if labelled else None, done.violations, done.manifest,
                                packed=Path(packed["packed"]) if packed else None)
        elif int8:
            from cifarpress.export.int8 import export_int8_checked

            labelled = int(check.labels.min()) >= 0  # random check inputs, or images without labels, have none
            if max_drop is not None and not labelled:
                raise CifarpressError("max_drop compares top-1 before and after int8; give labelled data= (a "
                                      "DataLoader of (images, labels))")
            done = export_int8_checked(model, path, calib, check, calibrator or DEFAULT_CALIBRATOR, calib_images,
                                       check_images, extra_metadata=meta, threads=threads, exclude=exclude,
                                       max_drop=max_drop)
            exported = Exported(done.path, "onnx", "int8", done.path, done.check, done.graph_check,
                                done.top1_drop_pp if labelled else None, done.violations, done.manifest)
        else:
            done = exports.export_model_checked(model, path, spec, check, images=check_images, tolerance=tolerance,
                                                threads=threads, metadata=meta)
            packed = exports.side_files(model, path.with_suffix(".packed"), meta.get("arch", type(model).__name__),
                                        spec.num_classes, spec.name)
            exported = Exported(path, "onnx", "quantized" if quantized else "fp32", path, done,
                                packed=Path(packed["packed"]) if packed else None)
    else:
        raise CifarpressError(f"cifarpress.export(): model is a {type(model).__name__}; give a torch model or a "
                              f"float .onnx file")
    if format == "tensorrt":
        from cifarpress.runtime.tensorrt import build_engine

        target = Path(engine) if engine else _engine_path(exported.onnx, precision)
        built = build_engine(exported.onnx, target, precision, opt_batch=opt_batch or min(64, max_batch),
                             max_batch=max_batch)
        exported.path, exported.engine, exported.format, exported.precision = built, built, "tensorrt", precision
    return exported


def _export_onnx_file(source: Path, path, format: str, precision: str, data, calibration, check_images: int,
                      calib_images: int, calibrator: str, max_drop, exclude, threads, data_root) -> Exported:
    """int8 and TensorRT from a cifarpress ONNX file alone: a float file is quantized by our own calibration
    into a QDQ file first (checked against the float file), so TensorRT int8 is explicit."""
    from cifarpress.runtime.onnx_file import read_onnx_metadata
    from cifarpress.runtime.tensorrt import onnx_has_qdq

    meta = read_onnx_metadata(source)  # also: a missing or unreadable file, in words
    if precision != "int8" or onnx_has_qdq(source):
        if format == "onnx" and onnx_has_qdq(source):
            raise CifarpressError(f"{source} is already quantized (Q/DQ); build an engine from it with format "
                                  f"tensorrt (--format tensorrt)")
        if format == "onnx":
            raise CifarpressError(f"{source} is already ONNX; build an engine from it with format tensorrt, or "
                                  f"quantize it with precision int8 (--format tensorrt, --precision int8)")
        return Exported(source, "onnx", precision, source, None)
    from cifarpress.export.int8 import quantize_onnx_int8_checked

    dataset = meta.get("dataset") or "cifar10"
    builtin = dataset in DATASETS
    test = _resolve(data if data is not None else (dataset if builtin else None), "test", data_root, "data")
    calib = calibration if calibration is not None else (dataset if builtin and data is None else None)
    calib = calib if _is_forward_loop(calib) else _resolve(calib, "train", data_root, "calibration")
    if calib is None or test is None:
        raise CifarpressError(f"{source} was exported for {dataset} data; give data= (check images) and "
                              f"calibration= (a DataLoader or batches of images) to quantize it")
    if not isinstance(test, CifarSplit) or not isinstance(calib, CifarSplit):
        from cifarpress.runtime.inputs import normalization_of

        normalization = normalization_of(meta)  # a user's batches are the model's inputs: map them as the file does
        mean, std = (normalization[0].ravel(), normalization[1].ravel()) if normalization else (None, None)
        shape = _shape_of(test, "data") or _shape_of(calib, "calibration")
        spec = custom_spec(len(meta.get("classes") or []) or 1, shape, mean, std, name=dataset)
        test = test if isinstance(test, CifarSplit) else _sample(test, spec, check_images, "data")
        calib = calib if isinstance(calib, CifarSplit) else _sample(calib, spec, calib_images, "calibration")
    target = Path(path) if path else source.with_suffix(".int8.onnx")
    done = quantize_onnx_int8_checked(source, target, calib, test, calibrator, calib_images, check_images,
                                      threads=threads, exclude=exclude, max_drop=max_drop)
    return Exported(done.path, "onnx", "int8", done.path, done.check, done.graph_check, done.top1_drop_pp,
                    done.violations, done.manifest)


# -- measuring exported files --------------------------------------------------------------------

DEVICES = ("cpu", "gpu", "jetson")


def bench(path: Union[str, Path], data: Optional[Data] = None, *, batch_sizes: Sequence[int] = (1, 64),
          threads: Optional[int] = None, seconds: float = 3.0, device: str = "cpu", iters: int = 200,
          data_root: Union[str, Path, None] = None) -> dict:
    """Measure an exported file on this machine: latency p50/p90/p99 and throughput per batch size, peak
    memory, size, and with `data` top-1 (a dataset name means its test split). An .onnx runs in onnxruntime
    on the CPU (device "cpu"); a TensorRT .engine on an NVIDIA GPU ("gpu", or "jetson" with tegrastats power).
    The input shape is the file's own. Returns the measurement as a dict (what `cifarpress bench` writes).

        cifarpress.bench("model.int8.onnx", test_loader, batch_sizes=[1, 32])["latency_ms"]["1"]["p50"]
    """
    path = Path(path)
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise CifarpressError("batch sizes must be >= 1")
    if device not in DEVICES:
        raise CifarpressError(f"unknown device '{device}'; use cpu, gpu or jetson")
    is_engine = path.suffix in (".engine", ".plan")
    if device == "cpu" and is_engine:
        raise CifarpressError(f"{path} is a TensorRT engine; bench it with device gpu or jetson")
    if device != "cpu" and not is_engine:
        raise CifarpressError(f"device {device} benches a TensorRT engine; build one with export(format="
                              f"'tensorrt') (`cifarpress export MODEL.pt --format tensorrt`) and pass the .engine")
    if not is_engine:
        from cifarpress.runtime.latency import bench_onnx

        path = _existing_onnx(path)  # before the data: a missing file is the first thing to say
        return bench_onnx(path, batch_sizes, threads, _resolve(data, "test", data_root, "data"), seconds)
    from cifarpress.runtime.tensorrt import bench_engine, require_tensorrt

    require_tensorrt()
    if not path.is_file():
        raise CifarpressError(f"engine {path} not found; build one with export(format='tensorrt')")
    test = _resolve(data, "test", data_root, "data")
    if device == "jetson":
        from cifarpress.runtime.tegrastats import TegraStatsSampler

        with TegraStatsSampler() as sampler:
            result = bench_engine(path, batch_sizes, iters=iters, test_split=test)
        result["tegrastats"] = sampler.summary()
        return result
    return bench_engine(path, batch_sizes, iters=iters, test_split=test)


def compare(paths: Sequence[Union[str, Path]], data: Optional[Data] = None, *, batch_sizes: Sequence[int] = (1, 64),
            threads: Optional[int] = None, seconds: float = 3.0, rounds: int = 3,
            data_root: Union[str, Path, None] = None) -> dict:
    """Several exported .onnx files side by side on this CPU: latency timed in turn over `rounds` (so machine
    noise hits all alike; medians reported), size, and with `data` top-1, with ratios against the first.

        cifarpress.compare(["fp32.onnx", "int8.onnx"], test_loader)["models"][1]["latency_vs_first"]
    """
    from cifarpress.runtime.latency import compare_onnx

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise CifarpressError("compare needs two or more ONNX files (the first is the reference); for one file "
                              "use bench")
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise CifarpressError("batch sizes must be >= 1")
    if rounds < 1:
        raise CifarpressError(f"rounds must be >= 1, got {rounds}")
    for path in paths:
        if not path.is_file():
            raise CifarpressError(f"{path} not found; export a model first")
        if path.suffix != ".onnx":
            raise CifarpressError(f"{path} is not an .onnx file; compare measures ONNX files in onnxruntime")
    return compare_onnx(paths, batch_sizes, threads, _resolve(data, "test", data_root, "data"), seconds, rounds)


__all__ = ["Calibration", "Data", "Exported", "bench", "compare", "distill", "evaluate", "export", "prune",
           "quantize", "run_stage", "stage_config", "stage_plugins", "train", "train_config"]
