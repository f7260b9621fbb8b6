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

import copy
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from cifarpress.datasets import DATASETS
from cifarpress.errors import CifarpressError, RecipeError
from cifarpress.techniques import Technique, addon_techniques, stage_techniques
from cifarpress.techniques.distill.config import DistillConfig
from cifarpress.train.options import TrainingOptions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    arch: str = Field(description="Zoo name or package.module:factory")
    checkpoint: Optional[str] = Field(None, description="Model file, builtin:NAME, or omitted for random init")


# -- training stages, built from the technique catalogue -------------------------------------------
# A training stage's body is flat in YAML (`- prune: {method: hesso, macs: 0.5, epochs: 10, distill: {...}}`):
# the training options, the stage technique's own config (one class per method) and the add-ons any
# training stage may carry. Each (technique, method) gets one schema class made of exactly those three
# parts, so the technique's validators run when the recipe loads, and `technique_config` hands its plug-in
# the technique's own config object.


def _addon_fields() -> dict:
    return {t.name: (t.config, t.default) for t in addon_techniques()}


TrainStage = create_model("TrainStage", __base__=TrainingOptions, __config__=None, __doc__=(
    "Train or fine-tune the current model, with any add-ons (distill, ema, mesa)."), **_addon_fields())


def _with_training_defaults(technique: Technique) -> dict:
    """The stage's own defaults (prune trains 10 epochs) on the shared fields, constraints kept."""
    fields = {}
    for name, value in technique.training_defaults.items():
        info = copy.copy(TrainingOptions.model_fields[name])
        info.default = value
        fields[name] = (info.annotation, info)
    return fields


def _stage_classes(technique: Technique) -> dict[str, type]:
    """{method: schema class} of a stage technique (one entry when its config has no method union)."""
    classes = {}
    for config in technique.methods():
        method = config.model_fields["method"].default if "method" in config.model_fields else technique.name
        classes[method] = create_model(f"{technique.name.title()}{config.__name__}Stage", __base__=(TrainStage, config),
                                       __doc__=config.__doc__, **_with_training_defaults(technique))
    return classes


STAGE_CLASSES: dict[str, dict[str, type]] = {t.name: _stage_classes(t) for t in stage_techniques()}
METHOD_TAGS = {method for classes in STAGE_CLASSES.values() for method in classes}


def _stage_body_type(classes: dict[str, type]):
    members = tuple(classes.values())
    return members[0] if len(members) == 1 else Annotated[Union[members], Field(discriminator="method")]


def stage_body(kind: str, **values):
    """A validated body of stage `kind` (e.g. stage_body("prune", macs=0.5)): its method's schema class."""
    classes = STAGE_CLASSES[kind]
    if len(classes) > 1:
        values.setdefault("method", next(iter(classes)))  # the catalogue's first method, as in a recipe
    return TypeAdapter(_stage_body_type(classes)).validate_python(values)


def stage_field(kind: str, name: str):
    """The FieldInfo of `name` in stage `kind`, whichever method declares it (CLI help, defaults)."""
    classes = {"train": TrainStage, "distill": DistillStage, "export": ExportStage}
    for cls in ([classes[kind]] if kind in classes else STAGE_CLASSES[kind].values()):
        if name in cls.model_fields:
            return cls.model_fields[name]
    raise KeyError(f"{kind} has no field {name}")


def stage_schemas() -> dict[str, dict[str | None, type]]:
    """{stage: {method or None: schema class}} for every stage a recipe may hold."""
    return {"train": {None: TrainStage}, **STAGE_CLASSES, "distill": {None: DistillStage}, "export": {None: ExportStage}}


def technique_config(body: BaseModel, technique: Technique):
    """The stage technique's own config object, taken out of a stage body whose class includes it."""
    config = next(c for c in technique.methods() if isinstance(body, c))
    return config.model_validate({name: getattr(body, name) for name in config.model_fields})


class DistillStage(TrainStage):
    """Train a new student architecture from a teacher (by default the model entering the stage)."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(0.1, gt=0)
    arch: str = Field(description="Student: zoo name or package.module:factory")
    checkpoint: Optional[str] = Field(None, description="Student's starting weights; omitted = random init")
    distill: DistillConfig = Field(default_factory=DistillConfig)


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
    tolerance: Optional[float] = Field(None, gt=0, description="Max logit difference allowed, times max(1, the "
                                       "largest |logit|); default 1e-4 for a float model, 2% of the largest "
                                       "logit for a quantized one with int8 activations")
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


STAGE_TYPES: dict[str, object] = {"train": TrainStage, **{kind: _stage_body_type(classes)
                                                        for kind, classes in STAGE_CLASSES.items()},
                                   "distill": DistillStage, "export": ExportStage}


class _StageBase(Strict):
    @model_validator(mode="before")
    @classmethod
    def one_key(cls, value):
        if isinstance(value, str) and value in STAGE_TYPES:
            value = {value: {}}  # "- export" is shorthand for "- export: {}"
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"each stage is a mapping with one key, one of: {', '.join(STAGE_TYPES)}")
        key, body = next(iter(value.items()))
        if key not in STAGE_TYPES:
            raise ValueError(f"unknown stage '{key}'; choose one of: {', '.join(STAGE_TYPES)}")
        body = {} if body is None else body
        if isinstance(body, dict) and len(STAGE_CLASSES.get(key, ())) > 1 and "method" not in body:
            body = {**body, "method": next(iter(STAGE_CLASSES[key]))}  # the catalogue's first method
        return {key: body}

    @property
    def kind(self) -> str:
        return next(k for k in STAGE_TYPES if getattr(self, k) is not None)

    @property
    def config(self) -> Strict:
        return getattr(self, self.kind)


Stage = create_model("Stage", __base__=_StageBase, **{kind: (Optional[body], None) for kind, body in STAGE_TYPES.items()})


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
        # a discriminated union adds its tag ("hesso") to the path: the YAML has no such level
        loc = tuple(p for p in e["loc"] if p not in ("function-before[one_key()]",) and p not in METHOD_TAGS)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid":  # an unknown `method`: name the key and the choices
            loc += (e["ctx"]["discriminator"].strip("'"),)
            msg = f"unknown method {e['ctx']['tag']!r}; choose one of: {e['ctx']['expected_tags']}"
        if e["type"] == "extra_forbidden":
            tag = next((part for part in e["loc"] if part in METHOD_TAGS), None)
            msg = (f"unknown key{f' for method {tag}' if tag else ''} (check the spelling; `cifarpress stages` "
                   f"lists every stage's keys)")
        lines.append(f"{source}: {_labelled(_field_path(loc), labels)}: {msg}")
    return "\n".join(lines)


def applied_in(kind: str, body) -> list[tuple[Technique, object]]:
    """(technique, its config) for every catalogued technique a stage body applies: the stage's own (prune,
    quantize) and each add-on it switches on, in catalogue order."""
    from cifarpress import techniques

    applied = [(techniques.TECHNIQUES[kind], technique_config(body, techniques.TECHNIQUES[kind]))] \
        if kind in STAGE_CLASSES else []
    return applied + [(t, value) for t in techniques.TECHNIQUES.values()
                      if t.kind == "addon" and (value := getattr(body, t.name, None)) not in (None, False)]


def applied_techniques(kind: str, body) -> list[dict]:
    """What a training stage applies, for the model file's record: {name, config} per technique it uses."""
    return [{"name": technique.name, "config": config.model_dump(mode="json") if hasattr(config, "model_dump")
             else config} for technique, config in applied_in(kind, body)]


def active_techniques(stage) -> list[str]:
    """The names of the catalogued techniques a recipe stage applies."""
    return [technique.name for technique, _ in applied_in(stage.kind, stage.config)]


def _check_conflicts(stage, where: str) -> None:
    """The catalogue's declared conflicts, checked when the recipe loads rather than after earlier stages ran."""
    from cifarpress import techniques

    active = active_techniques(stage)
    for name in active:
        clash = sorted(techniques.TECHNIQUES[name].excludes & set(active))
        if clash:
            raise RecipeError(f"{where}: {name} cannot be combined with {clash[0]} in one stage; "
                              f"put them in stages of their own")


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
    for i, stage in enumerate(recipe.stages):
        _check_conflicts(stage, f"{source}: {_labelled(f'stages[{i}].{stage.kind}', labels)}")
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

