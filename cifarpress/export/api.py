"""The export entry points shared by the pipeline's stages and `cifarpress export`: what kind of file a model
becomes is decided here, once, not by each caller.

A float model becomes a plain ONNX graph checked against PyTorch; a fake-quantized one (any catalogued
quantizer's layers) a QDQ graph checked against its own fake-quant forward, plus the packed low-bit file.
Every file is written to a temporary name, checked, then moved into place (onnx.publish_checked).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from cifarpress.data import CifarSplit, DatasetSpec
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import (
    ExportCheck,
    check_indices,
    check_onnx,
    export_onnx,
    publish_checked,
)
from cifarpress.export.packed import save_packed
from cifarpress.export.qdq import check_qdq, export_qdq
from cifarpress.techniques.quantize.ternary import layer_report, quantized_layers
from cifarpress.utils.io import atomic_write_json


def is_fake_quantized(model: nn.Module) -> bool:
    return bool(quantized_layers(model))


def quantized_layer_rows(model: nn.Module) -> list[dict] | None:
    """The report's per-layer rows of a quantized model (precision, bits, zeros, scale, packed bytes); None
    for a float one."""
    return layer_report(model) if is_fake_quantized(model) else None


def export_model_checked(model: nn.Module, path: str | Path, spec: DatasetSpec, test: CifarSplit, *,
                         images: int = 1000, tolerance: float | None = None, threads: int | None = None,
                         metadata: dict | None = None) -> ExportCheck:
    """The model's deployable ONNX at `path`, checked in onnxruntime on `images` test images. tolerance None:
    1e-4 for a float model; for a quantized one check_qdq's own (2% of the largest logit with int8 inputs)."""
    if is_fake_quantized(model):  # the same class-balanced draw as a float model's check
        subset = test.subset(check_indices(test, images))
        return publish_checked(path, lambda tmp: export_qdq(model, tmp, spec, test.classes, metadata),
                               lambda tmp: check_qdq(model, tmp, subset, tolerance, threads))
    return publish_checked(path, lambda tmp: export_onnx(model, tmp, spec, test.classes, metadata),
                           lambda tmp: check_onnx(model, tmp, test, images, tolerance or 1e-4, threads))


def side_files(model: nn.Module, folder: Path, arch: str, num_classes: int, dataset: str) -> dict:
    """What ships beside the ONNX: for a quantized model its packed low-bit file ({} for a float one)."""
    if not is_fake_quantized(model):
        return {}
    packed = save_packed(model, Path(folder) / "model.packed", arch, num_classes, dataset)
    return {"packed": str(packed), "packed_bytes": packed.stat().st_size}


def int8_sensitivity_file(float_path: Path, exported, train: CifarSplit, test: CifarSplit, calibrator: str,
                          check_images: int) -> tuple[list[dict], Path, int]:
    """Rank the layers by the top-1 lost when each alone is int8 (graph math, the check images) and write the
    ranking beside the int8 file as MODEL.int8.sensitivity.json. Returns (ranking, that file, images used)."""
    from cifarpress.export.calibrate import manifest_images
    from cifarpress.export.int8 import int8_sensitivity

    indices = check_indices(test, check_images)
    ranking = int8_sensitivity(float_path, manifest_images(exported.manifest, train),
                               test.images[indices].float() / 255.0, test.labels[indices].numpy(), calibrator)
    target = exported.path.with_name(exported.path.name.removesuffix(".onnx") + ".sensitivity.json")
    atomic_write_json(target, {"model": str(exported.path), "images": len(indices), "calibrator": calibrator,
                               "layers": ranking})
    return ranking, target, len(indices)


def export_file(checkpoint: str, output: Path | None, fmt: str, precision: str | None, max_batch: int,
                calib_images: int, calibrator: str, data_root, check_images: int, tolerance: float | None,
                arch: str | None, max_drop: float | None, exclude: list[str], sensitivity: bool, say) -> None:
    """`cifarpress export`: a model file or an ONNX file to a checked ONNX (fp32, ternary QDQ or int8 PTQ)
    and optionally a TensorRT engine; `say` prints each result line."""
    from cifarpress.data import check_classes, dataset_spec, load_split
    from cifarpress.model_file import load_model

    if fmt not in ("onnx", "tensorrt"):
        raise CifarpressError(f"unknown --format '{fmt}'; use onnx or tensorrt")
    precision = precision or ("fp32" if fmt == "onnx" else "fp16")
    allowed = ("fp32", "int8") if fmt == "onnx" else ("fp32", "fp16", "int8")
    if precision not in allowed:
        raise CifarpressError(f"--precision {precision} is not available for --format {fmt}; use one of "
                              f"{', '.join(allowed)}")
    int8 = {"exclude": list(exclude), "max_drop": max_drop, "sensitivity": sensitivity}
    if precision != "int8" and (exclude or max_drop is not None or sensitivity):
        raise CifarpressError("--max-drop, --exclude and --sensitivity apply to --precision int8 only")
    if fmt == "tensorrt":
        from cifarpress.runtime.tensorrt import require_tensorrt

        require_tensorrt()  # fail in one sentence before any work on a machine without it
    if checkpoint.endswith(".onnx"):
        if fmt == "onnx" and precision != "int8":
            raise CifarpressError(f"{checkpoint} is already ONNX; pass --format tensorrt to build an engine from it, "
                                  f"or --precision int8 to quantize it")
        _from_onnx(say, Path(checkpoint), output, fmt, precision, max_batch, calib_images, calibrator, check_images,
                   data_root, int8)
        return
    model, info = load_model(checkpoint, arch)
    spec = dataset_spec(info["dataset"] or "cifar10")
    test = load_split(spec.name, "test", data_root)
    check_classes(info["num_classes"], test)
    source = Path(checkpoint)
    stem = source.with_suffix("") if source.suffix == ".pt" else Path(info["arch"])
    quantized = is_fake_quantized(model)
    if precision == "int8" and quantized and fmt == "onnx":
        raise CifarpressError(f"{checkpoint} is already quantized (ternary); export it without --precision int8")
    if precision == "int8" and not quantized:
        # Both formats get int8 from our own calibration into a QDQ graph checked against the float model:
        # TensorRT then builds it as explicit int8 (its implicit calibrators are deprecated in 10, gone in 11).
        path = output if (output and fmt == "onnx") else Path(f"{stem}.int8.onnx")
        _export_int8(say, model, info, path, spec, test, data_root, calib_images, calibrator, check_images, int8)
    else:
        path = output if (output and fmt == "onnx") else stem.with_suffix(".onnx")
        # --tolerance applies to quantized models too; without it, check_qdq's default for the graph's inputs
        check = export_model_checked(model, path, spec, test, images=check_images, tolerance=tolerance,
                                     metadata={"arch": info["arch"]})
        say(f"{path}: {path.stat().st_size / 1e6:.2f} MB; onnxruntime vs PyTorch on {check.images} test "
            f"images: max |diff| {check.max_abs_diff:.2e}, top-1 agreement {check.top1_agreement:.2f}%")
    if fmt == "tensorrt":
        _build_engine(say, path, output or stem.with_suffix(f".{precision}.engine"), precision, max_batch)


def _from_onnx(say, path: Path, output: Path | None, fmt: str, precision: str, max_batch: int, calib_images: int,
               calibrator: str, check_images: int, data_root, int8: dict) -> None:
    """int8 and TensorRT engines from a cifarpress ONNX file alone. A float file is quantized by our own
    calibration into a QDQ file first (checked against the float file), so TensorRT int8 is explicit."""
    from cifarpress.data import load_split
    from cifarpress.export.int8 import quantize_onnx_int8_checked
    from cifarpress.runtime.onnx_file import read_onnx_metadata
    from cifarpress.runtime.tensorrt import onnx_has_qdq

    dataset = read_onnx_metadata(path).get("dataset") or "cifar10"  # also: a missing or unreadable file, in words
    # m.onnx -> m.int8.engine, and m.int8.onnx -> m.int8.engine too
    name = path.stem if path.stem.endswith(f".{precision}") else f"{path.stem}.{precision}"
    engine_path = output or path.with_name(f"{name}.engine")
    if precision == "int8" and not onnx_has_qdq(path):
        _require_calibrator(calibrator)
        target = output if (output and fmt == "onnx") else path.with_suffix(".int8.onnx")
        train, test = load_split(dataset, "train", data_root), load_split(dataset, "test", data_root)
        exported = quantize_onnx_int8_checked(path, target, train, test, calibrator, calib_images, check_images,
                                              exclude=int8["exclude"], max_drop=int8["max_drop"])
        _print_int8(say, exported, calibrator, "the float ONNX")
        if int8["sensitivity"]:
            _sensitivity(say, path, exported, train, test, calibrator, check_images)
        path = exported.path
    elif fmt == "onnx":
        raise CifarpressError(f"{path} is already quantized (Q/DQ); pass --format tensorrt to build an engine from it")
    if fmt == "tensorrt":
        _build_engine(say, path, engine_path, precision, max_batch)


def _build_engine(say, onnx_path: Path, engine_path: Path, precision: str, max_batch: int) -> None:
    from cifarpress.runtime.tensorrt import build_engine

    engine = build_engine(onnx_path, engine_path, precision, opt_batch=min(64, max_batch), max_batch=max_batch)
    say(f"{engine}: {engine.stat().st_size / 1e6:.2f} MB TensorRT {precision} engine (+ {engine.name}.json)")


def _require_calibrator(calibrator: str) -> None:
    from cifarpress.export.calibrate import CALIBRATORS

    if calibrator not in CALIBRATORS:  # before loading the training split
        raise CifarpressError(f"unknown --calibrator '{calibrator}'; choose one of {', '.join(CALIBRATORS)}")


def _print_int8(say, exported, calibrator: str, reference: str) -> None:
    rules = "follows TensorRT's explicit-quantization rules" if not exported.violations else "breaks TensorRT rules"
    from cifarpress.runtime.host import int8_kernels_exact

    graph = exported.graph_check
    say(f"{exported.path}: {exported.path.stat().st_size / 1e6:.2f} MB int8 QDQ ({calibrator} calibration on "
              f"{exported.manifest['count']} training images; {rules}); top-1 agreement with {reference} on "
              f"{exported.check.images} test images: the graph's own math (what TensorRT builds) "
              f"{graph.top1_agreement:.2f}%, onnxruntime on this CPU's int8 kernels "
              f"{exported.check.top1_agreement:.2f}%"
              + ("" if int8_kernels_exact() else " (no VNNI here: weights run in 7-bit range)")
              + (f"; top-1 lost against it: {exported.top1_drop_pp:.2f} pp" if exported.top1_drop_pp is not None
                 else ""))


def _export_int8(say, model, info: dict, onnx_path: Path, spec, test, data_root, calib_images: int, calibrator: str,
                 check_images: int, int8: dict) -> None:
    """Post-training int8 QDQ export; reports its top-1 agreement with the float model through onnxruntime."""
    import tempfile

    from cifarpress.data import load_split
    from cifarpress.export.int8 import export_int8_checked
    from cifarpress.export.onnx import export_onnx

    _require_calibrator(calibrator)
    train = load_split(spec.name, "train", data_root)
    exported = export_int8_checked(model, onnx_path, train, test, calibrator, calib_images, check_images,
                                   extra_metadata={"arch": info["arch"]}, exclude=int8["exclude"],
                                   max_drop=int8["max_drop"])
    _print_int8(say, exported, calibrator, "PyTorch fp32")
    if int8["sensitivity"]:
        with tempfile.TemporaryDirectory() as tmp:
            float_path = export_onnx(model, Path(tmp) / "float.onnx", spec, test.classes, {"arch": info["arch"]})
            _sensitivity(say, float_path, exported, train, test, calibrator, check_images)


def _sensitivity(say, float_path: Path, exported, train, test, calibrator: str, check_images: int) -> None:
    """Say the per-layer int8 sensitivity ranking, written beside the int8 file."""
    from rich.table import Table

    ranking, target, images = int8_sensitivity_file(float_path, exported, train, test, calibrator, check_images)
    table = Table(title=f"int8 sensitivity: top-1 lost on {images} test images when one layer alone is int8")
    for col in ("layer", "op", "Δ top-1 pp"):
        table.add_column(col, justify="right" if col.startswith("Δ") else "left")
    for row in ranking:
        table.add_row(row["layer"], row["op"], f"{0.0 - row['top1_drop_pp']:+.2f}")
    say(table)
    say(f"wrote {target}; keep the worst in float with --exclude LAYER")
