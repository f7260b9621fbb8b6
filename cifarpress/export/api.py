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
    FLOAT_TOLERANCE,
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
    """The model's deployable ONNX at `path`, checked in onnxruntime on `images` test images. tolerance is
    relative (times max(1, the largest |logit|)); None: 1e-4 for a float model, for a quantized one check_qdq's
    own (2% of the largest logit with int8 inputs)."""
    if is_fake_quantized(model):  # the same class-balanced draw as a float model's check
        subset = test.subset(check_indices(test, images))
        return publish_checked(path, lambda tmp: export_qdq(model, tmp, spec, test.classes, metadata),
                               lambda tmp: check_qdq(model, tmp, subset, tolerance, threads))
    float_tolerance = FLOAT_TOLERANCE if tolerance is None else tolerance
    return publish_checked(path, lambda tmp: export_onnx(model, tmp, spec, test.classes, metadata),
                           lambda tmp: check_onnx(model, tmp, test, images, float_tolerance, threads))


def side_files(model: nn.Module, packed_path: Path, arch: str, num_classes: int, dataset: str) -> dict:
    """What ships beside the ONNX: for a quantized model its packed low-bit file at `packed_path` ({} for a
    float one)."""
    if not is_fake_quantized(model):
        return {}
    packed = save_packed(model, packed_path, arch, num_classes, dataset)
    return {"packed": str(packed), "packed_bytes": packed.stat().st_size}


def int8_sensitivity_file(float_path: Path, int8_path: Path, manifest: dict, train: CifarSplit, test: CifarSplit,
                          calibrator: str, check_images: int) -> tuple[list[dict], Path, int]:
    """Rank the layers by the top-1 lost when each alone is int8 (graph math, the check images, calibrated on the
    images of `manifest`, the int8 export's) and write the ranking beside the int8 file as
    MODEL.int8.sensitivity.json. Returns (ranking, that file, images used)."""
    from cifarpress.export.calibrate import manifest_images
    from cifarpress.export.int8 import int8_sensitivity

    indices = check_indices(test, check_images)
    ranking = int8_sensitivity(float_path, manifest_images(manifest, train),
                               test.pixels(indices), test.labels[indices].numpy(), calibrator)
    target = int8_path.with_name(int8_path.name.removesuffix(".onnx") + ".sensitivity.json")
    atomic_write_json(target, {"model": str(int8_path), "images": len(indices), "calibrator": calibrator,
                               "layers": ranking})
    return ranking, target, len(indices)
