"""Recipes: YAML files validated by pydantic, with errors that name the field.

    name: quickstart
    dataset: cifar10
    model: {arch: resnet20, checkpoint: builtin:resnet20-cifar10}
    stages:
      - train: {epochs: 1, lr: 0.01}
      - export: {format: onnx}
    bench: {batch_sizes: [1, 64]}

Each stage is a one-key mapping, the key naming the stage type. Relative
paths are read relative to the recipe file's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cifarpress.datasets import DATASETS
from cifarpress.errors import CifarpressError, RecipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    arch: str = Field(description="Zoo name or package.module:factory")
    checkpoint: Optional[str] = Field(None, description="Model file, builtin:NAME, or omitted for random init")


class TrainingOptions(Strict):
    """The training-loop settings every training stage shares."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["onecycle", "cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, le=0.5)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)
    seed: int = 0

    def training_options(self) -> dict:
        return {name: getattr(self, name) for name in TrainingOptions.model_fields}


class DistillOptions(Strict):
    """Distillation from a teacher, as a loss added to a training stage."""

    teacher: Optional[str] = Field(None, description="Model file or builtin:NAME; omitted = the model entering the stage")
    method: Literal["kd", "dkd", "nkd"] = "kd"
    weight: Optional[float] = Field(None, ge=0, description="Distillation term weight (kd 0.9, dkd/nkd 1)")
    label_weight: Optional[float] = Field(None, ge=0, description="Cross-entropy weight (kd 0.1, dkd/nkd 1)")
    temperature: Optional[float] = Field(None, gt=0, description="kd/dkd 4, nkd 1")
    alpha: float = Field(1.0, ge=0, description="DKD: target-class term weight")
    beta: float = Field(8.0, ge=0, description="DKD: non-target term weight")
    gamma: float = Field(1.5, ge=0, description="NKD: non-target term weight")
    warmup_epochs: Optional[float] = Field(None, ge=0, description="Linear ramp of the term (default: dkd epochs/12)")

    @model_validator(mode="after")
    def method_specific(self):
        for name, method in (("alpha", "dkd"), ("beta", "dkd"), ("gamma", "nkd")):
            if name in self.model_fields_set and self.method != method:
                raise ValueError(f"{name} applies only to method {method}, not {self.method}")
        return self


class TrainStage(TrainingOptions):
    """Train or fine-tune the current model (optionally with an EMA of weights)."""

    ema: bool = False
    distill: Optional[DistillOptions] = None


# (start_fraction, end_fraction) of the pruning window when a prune stage leaves them out. HESSO's
# was measured: ResNet-20 at 50% MACs, 10 epochs, fisher saliency, 0.05-0.3 gave 85.89% against
# 84.56% for magnitude-taylor over 0.1-0.5 (bench/results/prune_vs_torch_pruning-resnet20.json).
PRUNE_WINDOW = {"hesso": (0.05, 0.3), "dhspg": (0.1, 0.8)}


def _window_defaults(end: int) -> str:
    return ", ".join(f"{window[end]:g} for {method}" for method, window in PRUNE_WINDOW.items())


class PruneStage(TrainingOptions):
    """OTO-style structured pruning: drive whole channel groups to zero while training, then cut them out."""

    epochs: int = Field(10, ge=1)
    method: Literal["hesso", "dhspg"] = "hesso"
    sparsity: Optional[float] = Field(None, gt=0, lt=1, description="Fraction of prunable groups to remove")
    macs: Optional[float] = Field(None, gt=0, lt=1, description="Fraction of MACs to keep")
    channel_multiple: int = Field(8, ge=1, description="Kept widths rounded to a multiple of this; match the "
                                  "target's kernel block (16 for onnxruntime on AVX-512 CPUs, see "
                                  "bench/width_rounding.py)")
    remove_branches: bool = Field(False, description="Let a residual branch's inner width go to zero, so the "
                                  "block becomes its shortcut plus a constant: whole convs removed, faster per MAC "
                                  "saved than narrow widths on CPUs")
    selection: Literal["score", "score-per-mac", "uniform"] = Field(
        "score-per-mac", description="macs target: cut the lowest score per MAC saved, the lowest-scoring groups "
        "(score), or every unit by a common fraction topped up per MAC (uniform)")
    start_fraction: Optional[float] = Field(None, ge=0, lt=1, description="Share of steps trained before pruning "
                                            "starts (default " + _window_defaults(0) + ")")
    end_fraction: Optional[float] = Field(None, gt=0, le=1, description="Share of steps by which groups are zero "
                                          "(default " + _window_defaults(1) + ")")
    pruning_periods: int = Field(5, ge=1, description="HESSO: periods over which the target is reached")
    saliency: Literal["magnitude-taylor", "fisher"] = Field(
        "fisher", description="HESSO: group importance from the current step's magnitude and Taylor "
        "terms, or from squared Taylor terms averaged over each period (fisher)")
    penalty: float = Field(0.1, ge=0, description="DHSPG: group-lasso strength (lambda)")
    epsilon: float = Field(0.0, ge=0, description="DHSPG: half-space projection threshold")
    distill: Optional[DistillOptions] = None

    @model_validator(mode="after")
    def one_target(self):
        if (self.sparsity is None) == (self.macs is None):
            raise ValueError("give exactly one target: sparsity (fraction of groups removed) "
                             "or macs (fraction of MACs kept), each in (0, 1)")
        return self


class QuantizeStage(TrainingOptions):
    """Quantization-aware training: BitNet b1.58 ternary weights ({-1, 0, +1} x scale)."""

    epochs: int = Field(5, ge=1)
    method: Literal["ternary"] = "ternary"
    scale: Literal["absmean", "absmedian"] = "absmean"
    granularity: Literal["tensor", "channel"] = "tensor"
    act_bits: Optional[Literal[8]] = Field(None, description="8 to quantize layer inputs to int8; omit for float")
    act_granularity: Literal["tensor", "sample"] = "tensor"
    keep: Optional[list[str]] = Field(None, description="Layers kept at 8 bits (default: first conv and classifier)")
    warmup_steps: int = Field(0, ge=0, description="Steps blending from full precision to ternary")
    ema: bool = False
    distill: Optional[DistillOptions] = None


class DistillStage(TrainingOptions):
    """Train a new student architecture from a teacher (by default the model entering the stage)."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(0.1, gt=0)
    arch: str = Field(description="Student: zoo name or package.module:factory")
    checkpoint: Optional[str] = Field(None, description="Student's starting weights; omitted = random init")
    distill: DistillOptions = Field(default_factory=DistillOptions)
    ema: bool = False


class ExportStage(Strict):
    """Publish the current model as the deployable artifact."""

    format: Literal["onnx", "tensorrt"] = Field(
        "onnx", description="tensorrt: also build an engine from the ONNX (NVIDIA GPU) and time it beside an "
                            "engine of the recipe's starting model")
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="int8: post-training quantization to a TensorRT-ready QDQ graph, measured as a report "
                            "row (TensorRT then builds explicit int8 from it); fp16: TensorRT only")
    calibrator: Literal["minmax", "percentile", "entropy", "mse"] = "entropy"
    calib_images: int = Field(1024, ge=10, description="int8: class-balanced training images to calibrate on")
    check_images: int = Field(1000, ge=10, description="Test images compared between PyTorch and onnxruntime")
    tolerance: float = Field(1e-4, gt=0, description="Max abs logit difference allowed (fp32)")
    max_drop: Optional[float] = Field(None, ge=0, description="int8: fail the export when it loses more than this "
                                      "many pp of top-1 against the float model on the check images (the graph's "
                                      "own math), naming the layers that lose most")
    exclude: list[str] = Field(default_factory=list, description="int8: layers kept in float, by op type (Conv, "
                               "Gemm, Add), layer name (layer1.0.conv1, fc) or module prefix (layer3)")

    @model_validator(mode="after")
    def precision_fits_format(self):
        if self.precision == "fp16" and self.format != "tensorrt":
            raise ValueError("precision fp16 needs format: tensorrt (the ONNX file itself stays fp32 or int8)")
        if (self.max_drop is not None or self.exclude) and self.precision != "int8":
            raise ValueError("max_drop and exclude apply to precision: int8 only")
        return self


STAGE_TYPES: dict[str, type[Strict]] = {"train": TrainStage, "prune": PruneStage, "quantize": QuantizeStage,
                                         "distill": DistillStage, "export": ExportStage}


class Stage(Strict):
    train: Optional[TrainStage] = None
    prune: Optional[PruneStage] = None
    quantize: Optional[QuantizeStage] = None
    distill: Optional[DistillStage] = None
    export: Optional[ExportStage] = None

    @model_validator(mode="before")
    @classmethod
    def one_key(cls, value):
        if isinstance(value, str) and value in STAGE_TYPES:
            return {value: {}}  # "- export" is shorthand for "- export: {}"
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"each stage is a mapping with one key, one of: {', '.join(STAGE_TYPES)}")
        key, body = next(iter(value.items()))
        if key not in STAGE_TYPES:
            raise ValueError(f"unknown stage '{key}'; choose one of: {', '.join(STAGE_TYPES)}")
        return {key: {} if body is None else body}

    @property
    def kind(self) -> str:
        return next(k for k in STAGE_TYPES if getattr(self, k) is not None)

    @property
    def config(self) -> Strict:
        return getattr(self, self.kind)


class BenchSpec(Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64], min_length=1)
    threads: Optional[int] = Field(None, ge=1, description="onnxruntime intra-op threads (default: all cores)")
    seconds: float = Field(3.0, gt=0, description="Timing budget per batch size")
    rounds: int = Field(3, ge=1, le=20, description="The report times every row's file once per round, in turn "
                        "(as `cifarpress compare`), and gives the median and the range over rounds")

    @field_validator("batch_sizes")
    @classmethod
    def positive(cls, sizes):
        if any(b < 1 for b in sizes):
            raise ValueError("batch sizes must be >= 1")
        return sizes


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="Run folder name under runs/")
    dataset: Literal[tuple(DATASETS)] = "cifar10"  # type: ignore[valid-type]
    data_root: Optional[str] = None
    model: ModelSpec
    stages: list[Stage] = Field(min_length=1)
    bench: BenchSpec = Field(default_factory=BenchSpec)


def _field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "recipe"


def _labelled(path: str, labels: dict[str, str] | None) -> str:
    """`path` with its longest prefix found in `labels` replaced by that label (e.g. a command's option)."""
    for key in sorted(labels or {}, key=len, reverse=True):
        if path == key or path.startswith((key + ".", key + "[")):
            return labels[key] + path[len(key):]
    return path


def format_validation_error(exc: ValidationError, source: str, labels: dict[str, str] | None = None) -> str:
    lines = []
    for e in exc.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-before[one_key()]",))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `cifarpress compress --help`)"
        lines.append(f"{source}: {_labelled(_field_path(loc), labels)}: {msg}")
    return "\n".join(lines)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _checked_model_path(value: str, base: Path, source: str, field: str, relative_to: str) -> str:
    """A builtin:NAME that exists, or a path (relative to `base`) to an existing file."""
    from cifarpress.model_file import resolve_checkpoint

    if value.startswith("builtin:"):
        try:
            resolve_checkpoint(value)  # the one place that knows where built-ins live
        except CifarpressError as exc:
            raise RecipeError(f"{source}: {field}: {exc}") from None
        return value
    resolved = _resolve(value, base)
    if not resolved.is_file():
        raise RecipeError(f"{source}: {field}: file {resolved} not found; fix the path "
                          f"(relative paths start at {relative_to})")
    return str(resolved)


def recipe_from_dict(raw: dict, base: Path, source: str | Path, labels: dict[str, str] | None = None,
                     relative_to: str = "the recipe's folder") -> Recipe:
    """Validate a recipe mapping and check its model files; every problem is a RecipeError naming the field.

    Relative paths (checkpoints, teachers, data_root) are read relative to `base`, described as
    `relative_to` in messages. Each message starts with `source` (the recipe file, or the command that
    built the mapping); `labels` renames field paths in messages, e.g. {"stages[0].prune.sparsity":
    "--target"} for a command whose option sets that field.
    """
    source = str(source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source, labels)) from None
    base = Path(base).resolve()

    def checked(value: str, field: str) -> str:
        return _checked_model_path(value, base, source, _labelled(field, labels), relative_to)

    def known_arch(value: str, field: str) -> None:
        from cifarpress.models import (
            MODELS,  # late: the recipe schema itself stays torch-free
        )

        if ":" not in value and value not in MODELS:
            raise RecipeError(f"{source}: {_labelled(field, labels)}: unknown model '{value}'; choose one of "
                              f"{', '.join(MODELS)} or give package.module:factory")

    known_arch(recipe.model.arch, "model.arch")
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "distill":
            known_arch(stage.config.arch, f"stages[{i}].distill.arch")
    ckpt = recipe.model.checkpoint
    if ckpt:
        recipe.model.checkpoint = checked(ckpt, "model.checkpoint")
    for i, stage in enumerate(recipe.stages):
        cfg = stage.config
        for owner, field, label in ((getattr(cfg, "distill", None), "teacher", "distill.teacher"),
                                    (cfg, "checkpoint", "checkpoint")):
            value = getattr(owner, field, None) if owner is not None else None
            if value:
                setattr(owner, field, checked(value, f"stages[{i}].{stage.kind}.{label}"))
    if recipe.data_root:
        recipe.data_root = str(_resolve(recipe.data_root, base))
    if not ckpt and recipe.stages[0].kind != "train":
        raise RecipeError(f"{source}: stages[0]: a model without a checkpoint must be trained first; "
                          f"add a train stage or set model.checkpoint")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; every problem is a RecipeError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found; see recipes/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}:{where}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with name, model and stages")
    return recipe_from_dict(raw, path.resolve().parent, path)


def stage_dir_name(index: int, kind: str) -> str:
    return f"{index:02d}-{kind}"

