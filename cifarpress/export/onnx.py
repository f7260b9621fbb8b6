"""ONNX export that a device can use on its own, checked against PyTorch.

The exported graph takes float32 NCHW RGB in [0, 1] and normalizes inside
(folded into the first conv by onnxruntime/TensorRT), and its metadata names
the dataset, the classes and the preprocessing: nothing else ships with it.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import onnx
import torch
from torch import nn

from cifarpress.version import __version__
from cifarpress.data import CifarSplit, DatasetSpec, balanced_subset
from cifarpress.errors import CifarpressError
from cifarpress.runtime.onnx_file import INPUT_NAME, OUTPUT_NAME
from cifarpress.utils.io import atomic_write
from cifarpress.utils.modules import unwrap
from cifarpress.utils.progress import progress

OPSET = 18
FLOAT_TOLERANCE = 1e-4  # a float export's parity bound, relative: times max(1, the largest |logit|)
T = TypeVar("T")


class NormalizedClassifier(nn.Module):
    """Wraps a model trained on normalized inputs so it takes pixels in [0, 1]."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        # Not "mean": torch.onnx's constant folding names a folded aten.mean (a weight-standardized conv's
        # weight.mean()) "mean" too, and the clash fails the dynamo export (the TorchScript fallback then
        # renames the weights, which QDQ export reads by name).
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.input_mean) * self.input_inv_std)


class ExportCheckError(CifarpressError):
    """onnxruntime disagrees with PyTorch beyond tolerance."""


@dataclass
class ExportCheck:
    images: int
    max_abs_diff: float
    top1_agreement: float

    def to_dict(self) -> dict:
        return {"images": self.images, "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement}


def _torch_export(wrapped: nn.Module, path: str, opset: int, input_shape: tuple[int, ...]) -> None:
    example = torch.rand(2, *input_shape)  # the batch is dynamic; channels and size are fixed by this example
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(
                wrapped, (example,), path, dynamo=True, opset_version=opset, external_data=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            )
            return
        except Exception as first:  # user models torch.export cannot trace: try the TorchScript exporter
            dynamo_error = first
        try:
            torch.onnx.export(
                wrapped, (example,), path, dynamo=False, opset_version=max(17, min(opset, 20)),
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        except Exception as exc:
            raise CifarpressError(
                f"ONNX export failed ({type(dynamo_error).__name__}: {str(dynamo_error).splitlines()[0][:200]}); "
                f"the model likely uses an operation ONNX cannot express"
            ) from exc


def export_onnx(model: nn.Module, path: str | Path, spec: DatasetSpec, classes: list[str],
                extra_metadata: dict | None = None, opset: int = OPSET) -> Path:
    """Write `model` (trained on normalized inputs) as a self-contained ONNX file, atomically."""
    model = unwrap(model)
    model = model.to(memory_format=torch.contiguous_format)
    was_training = model.training
    wrapped = NormalizedClassifier(model, spec.mean, spec.std).eval()
    channels, height, width = spec.input_shape
    shape = f"{'RGB' if channels == 3 else f'{channels}-channel'} {height}x{width}"
    if spec.normalizes:  # the graph takes pixels and normalizes them itself
        described = f"float32 NCHW {shape}, pixel values in [0, 1]"
        preprocessing = {"scale": "1/255", "mean": list(spec.mean), "std": list(spec.std),
                         "normalization": "inside the graph"}
    else:  # a user's data with its own transform: the graph takes exactly what the model takes
        described = f"float32 NCHW {shape}, the model's own inputs"
        preprocessing = {"scale": "none", "mean": list(spec.mean), "std": list(spec.std),
                         "normalization": "none inside the graph (inputs as the model takes them)"}
    metadata = {
        "producer": f"cifarpress {__version__}",
        "dataset": spec.name,
        "classes": json.dumps(classes),
        "input": described,
        "preprocessing": json.dumps(preprocessing),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()},
    }

    def write(tmp: str) -> None:
        with torch.no_grad():
            _torch_export(wrapped, tmp, opset, spec.input_shape)
        proto = onnx.load(tmp)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    try:
        return atomic_write(path, write)
    finally:
        model.train(was_training)


def publish_checked(path: str | Path, export: Callable[[Path], object], check: Callable[[Path], T]) -> T:
    """Export to a temporary file beside `path`, check it, and only then move it into place.

    A failed check leaves no unfaithful file at `path` (an earlier file there stays as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unchecked = path.with_name(f".{path.stem}.unchecked.{secrets.token_hex(4)}{path.suffix}")
    try:
        export(unchecked)
        try:
            result = check(unchecked)
        except ExportCheckError as exc:  # name the file the user asked for, not the temporary one
            raise type(exc)(str(exc).replace(str(unchecked), str(path))) from None
        os.replace(unchecked, path)
    finally:
        unchecked.unlink(missing_ok=True)
    return result


@torch.no_grad()
def compare_with_onnxruntime(wrapped: nn.Module, session, pixels: torch.Tensor,
                             batch: int = 250) -> tuple[ExportCheck, float]:
    """Logits of `wrapped` (PyTorch) vs the onnxruntime session on `pixels` in [0, 1].

    Returns the check (max abs difference, top-1 agreement) and the largest |logit|,
    against which a relative tolerance can be set."""
    broken = [name for name, t in wrapped.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:  # an infinite BatchNorm variance can still give finite logits: refuse the model itself
        raise ExportCheckError(
            f"the model holds NaN or infinite values in {len(broken)} tensors ({', '.join(broken[:3])}); it is broken "
            f"(diverged training?): retrain it with a lower learning rate")
    max_diff, agree, largest = 0.0, 0, 0.0
    for start in progress(range(0, len(pixels), batch), what="export check: PyTorch vs onnxruntime"):
        x = pixels[start:start + batch]
        ref = wrapped(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        # max() would let a NaN through (max(0.0, nan) is 0.0): a non-finite logit fails whatever the tolerance.
        for name, logits in (("PyTorch", ref), ("onnxruntime", got)):
            if not np.isfinite(logits).all():
                bad = int((~np.isfinite(logits)).any(axis=1).sum())
                raise ExportCheckError(
                    f"{name} gives NaN or infinite logits on {bad} of {len(x)} test images; the model is broken "
                    f"(diverged training?): retrain it with a lower learning rate")
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        largest = max(largest, float(np.abs(ref).max()))
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
    check = ExportCheck(images=len(pixels), max_abs_diff=max_diff, top1_agreement=100.0 * agree / max(1, len(pixels)))
    return check, largest


def relative_tolerance(tolerance: float, largest_logit: float) -> float:
    """The largest |logit difference| a parity check allows: `tolerance` scaled by the logits' size (never below
    `tolerance` itself), since float rounding grows with the values."""
    return tolerance * max(1.0, largest_logit)


def check_indices(split: CifarSplit, images: int) -> torch.Tensor:
    """The test images every export check runs: a fixed class-balanced draw of `images` of them."""
    count = min(images, len(split))
    labelled = len(split) > 0 and int(split.labels.min()) >= 0  # a user's unlabelled sample holds -1: take it in order
    return balanced_subset(split.labels, count, seed=1) if labelled and count >= split.spec.num_classes \
        else torch.arange(count)


def check_pixels(split: CifarSplit, images: int) -> torch.Tensor:
    """check_indices' images as the exported graph takes them (pixels in [0, 1] for a CIFAR split)."""
    return split.pixels(check_indices(split, images))


def check_onnx(model: nn.Module, path: str | Path, split: CifarSplit, images: int = 1000,
               tolerance: float = FLOAT_TOLERANCE, threads: int | None = None, exact: bool = False) -> ExportCheck:
    """Run real images through onnxruntime and PyTorch; raise if logits differ beyond `tolerance` x max(1, the
    largest |logit|).

    The bound is relative to the logits' scale, as HESSO's finalize check is: float rounding grows with the
    values, so a faithful export of a model whose logits reach 1e4 differs by about 1e-3 (fp32's ulp there).

    exact: run the graph's own math (no onnxruntime fusions; for a QDQ file its quantization computed in
    float, as TensorRT builds it) rather than this host's kernels."""
    from cifarpress.runtime.ort import make_session

    model = unwrap(model)
    was_training = model.training
    wrapped = NormalizedClassifier(model, split.spec.mean, split.spec.std).eval()
    x = check_pixels(split, images)
    session = make_session(path, threads, optimize=not exact)
    try:
        check, largest_logit = compare_with_onnxruntime(wrapped, session, x)
    finally:
        model.train(was_training)  # like export_onnx: leave the caller's model in the mode it was in
    max_diff, allowed = check.max_abs_diff, relative_tolerance(tolerance, largest_logit)
    if max_diff > allowed:
        raise ExportCheckError(
            f"onnxruntime output of {path} differs from PyTorch by {max_diff:.2e} (> {allowed:.1e}: tolerance "
            f"{tolerance:g} x max(1, largest |logit| {largest_logit:.3g})) on {len(x)} test images, top-1 agreement "
            f"{check.top1_agreement:.2f}%; the export is not faithful"
        )
    return check
