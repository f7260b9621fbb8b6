"""onnxruntime sessions and what they compute: logits, predictions, top-1 (on this host's kernels, or the
graph's own math). Knows files, never a torch model, so export and bench share it without an import cycle."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from rich.console import Console

from cifarpress.data import CifarSplit
from cifarpress.errors import CifarpressError
from cifarpress.runtime.inputs import labelled_batches
from cifarpress.runtime.onnx_file import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata
from cifarpress.runtime.ort_lowering import lower_file
from cifarpress.utils.progress import progress

warn_console = Console(stderr=True)


def default_threads() -> int:
    return os.cpu_count() or 1


_warned_reduced: set[str] = set()


def warn_reduced_range(path: str | Path, counts: dict) -> None:
    """One line, once per file, when this host runs a file's int8 weights in 7-bit range (no VNNI)."""
    if counts.get("weights_7bit") and str(path) not in _warned_reduced:
        _warned_reduced.add(str(path))
        warn_console.print(
            f"note: this CPU has no VNNI, so onnxruntime's int8 kernels would saturate: {Path(path).name} runs "
            f"with its {counts['weights_7bit']} integer-kernel weights in 7-bit range here (exact on this host; "
            f"'graph' accuracy is the file's own QDQ math, what TensorRT builds)", highlight=False, markup=False)


def make_session(path: str | Path, threads: int | None = None, optimize: bool = True, lower: bool = True,
                 reduce_range: bool | None = None):
    """A CPU onnxruntime session; optimize=False runs the graph exactly as written (no fusions, no lowering):
    for a QDQ file, the file's own quantized math computed in float, the reference a TensorRT engine builds on.

    With optimize and lower, a QDQ graph is first lowered for onnxruntime's CPU kernels
    (cifarpress.runtime.ort_lowering): int8 ReLU and ReLU6 chains folded into uint8, duplicate
    quantizations merged, weight-only quantized layers' weights dequantized once, and on a host
    whose int8 kernels saturate (reduce_range None: no VNNI) integer-kernel weights in 7-bit range."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        lowered = None
        if optimize and lower:
            lowered, counts = lower_file(path, reduce_range)
            warn_reduced_range(path, counts)
        return ort.InferenceSession(lowered or str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CifarpressError(f"onnxruntime cannot load {path} ({str(exc).splitlines()[0][:200]})") from None


def check_input_shape(session, path: str | Path, image_shape: tuple) -> None:
    """One line naming both shapes when the file's input does not take these images (onnxruntime's own
    message names neither)."""
    declared = session.get_inputs()[0].shape  # e.g. ['batch', 3, 32, 32]; symbolic dims are str or None
    if len(declared) != len(image_shape) + 1 or any(isinstance(d, int) and d != want
                                                     for d, want in zip(declared[1:], image_shape)):
        shown = "x".join(str(d) if isinstance(d, int) else "N" for d in declared)
        raise CifarpressError(f"{path} takes input {shown}, but the images are "
                              f"N{''.join(f'x{d}' for d in image_shape)}; evaluate it on data of its own shape, "
                              f"or export a model for {'x'.join(map(str, image_shape))} inputs")


def onnx_logits(path: str | Path, images, threads: int | None = None, batch: int = 500,
                lower: bool = True, exact: bool = False) -> np.ndarray:
    """Logits per image through onnxruntime; images NCHW, uint8 (0-255) or float pixels in [0, 1].

    exact: the graph's own math (no fusions: a QDQ graph's quantization computed in float) instead of
    this host's kernels."""
    session = make_session(path, threads, optimize=not exact, lower=lower)
    check_input_shape(session, path, tuple(images.shape[1:]))
    logits = []
    for start in progress(range(0, len(images), batch), what=f"onnxruntime on {len(images)} images"):
        x = images[start:start + batch]
        x = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
        logits.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    return np.concatenate(logits)


def onnx_predictions(path: str | Path, images, threads: int | None = None, batch: int = 500,
                     lower: bool = True, exact: bool = False) -> np.ndarray:
    """Predicted class per image through onnxruntime (see onnx_logits)."""
    return onnx_logits(path, images, threads, batch, lower, exact).argmax(1)


def onnx_accuracy(path: str | Path, split, threads: int | None = None, batch: int = 500,
                  exact: bool = False) -> float:
    """Top-1 (%) of an exported model through onnxruntime (exact: the graph's own math rather than this host's
    kernels) on a CIFAR split, or on a user's (images, labels) batches of the model's inputs, streamed."""
    if isinstance(split, CifarSplit):
        predictions = onnx_predictions(path, split.images, threads, batch, exact=exact)
        return 100.0 * float((predictions == split.labels.numpy()).mean())
    session = make_session(path, threads, optimize=not exact)
    correct = total = 0
    for x, labels in labelled_batches(split, read_onnx_metadata(path)):
        check_input_shape(session, path, tuple(x.shape[1:]))
        correct += int((session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].argmax(1) == labels).sum())
        total += len(labels)
    if total == 0:
        raise CifarpressError("the evaluation data yields no batches; give it at least one (images, labels) batch")
    return 100.0 * correct / total


def is_quantized_graph(path: str | Path) -> bool:
    """A QDQ file, whose accuracy on this host's kernels can differ from its own math."""
    import onnx

    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for n in onnx.load(str(path), load_external_data=False).graph.node)


def accuracies(path: str | Path, split, threads: int | None = None) -> dict:
    """{"top1": as this host runs it} plus, for a QDQ file, {"top1_graph": the file's own math}."""
    result = {"top1": onnx_accuracy(path, split, threads)}
    if is_quantized_graph(path):
        result["top1_graph"] = onnx_accuracy(path, split, threads, exact=True)
    return result
