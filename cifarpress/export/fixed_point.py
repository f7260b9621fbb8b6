"""A fixed-point model (AdaPT) as the int8 engine the int8 export writes: exact weight codes, calibrated inputs.

export_qdq writes a quantized model as its own fake-quant math: int8 weights behind DequantizeLinear and a Q/DQ
pair in front of each int8 layer. onnxruntime fuses DQ -> Conv -> Q into an integer conv only where the conv's
output is quantized too, so such a graph runs its convs in float (resnet20 at batch 64: about 1.6x the int8
PTQ file's latency, bench/adapt.py). A deployed mixed-precision model should run as fast as int8 where its
layers are int8, so this export takes the int8 export's graph (export/int8.py: residual Adds quantized,
pre-ReLU pairs, per-consumer zero points, TensorRT's rules) and changes only what the model decided:

  * every layer at <= 8 bits keeps its own codes (the fixed-point codes times 2^-FL, times the folded BN
    factor per channel: read back exactly, as export_qdq does), not the int8 export's absmax codes;
  * every wider layer stays float (the int8 export's `exclude`), its weights the fixed-point values;
  * every int8 layer's input keeps the scale the training used (its running absmax / 127), so onnxruntime
    computes what the fake-quant model computed; calibrating those inputs again on training images instead
    (minmax, the closest calibrator) lost 0.34 pp on ResNet-20 (82.14% -> 81.80%, bench/adapt.py);
  * the tensors the training never quantized (both inputs of a residual Add, where they are not also a
    layer's input) are calibrated as the int8 export calibrates them (its calibrators, on a class-balanced
    draw of training images), by default with minmax, the closest to the training's absmax ranges.

The check is the int8 export's: onnxruntime against the PyTorch model with its weights quantized and its
inputs float (the dequantized copy), plus the top-1 kept on the check images; the file's own QDQ math
(exact=True) is recorded beside it, and TensorRT's explicit-quantization rules are checked.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper
from torch import nn

from cifarpress.data import CifarSplit
from cifarpress.errors import CifarpressError
from cifarpress.export.calibrate import manifest_images
from cifarpress.export.int8 import (
    Int8Export,
    _calibration_pixels,
    _enforce_max_drop,
    calibration_draw,
    check_int8_rules,
    quantize_onnx_int8,
)
from cifarpress.export.onnx import check_onnx, export_onnx, publish_checked
from cifarpress.export.qdq import WRAPPER_PREFIX, _fixed_point_codes, _per_channel, dequantized_copy, fits_int8
from cifarpress.techniques.quantize.ternary import quantized_layers
from cifarpress.utils.io import atomic_write
from cifarpress.utils.modules import unwrap


TRAINED_RANGE_CALIBRATOR = "minmax"  # what the training's absmax ranges are closest to


def is_fixed_point_int8(model: nn.Module) -> bool:
    """A model this export serves: fixed-point layers with int8 inputs (AdaPT's deploy mode)."""
    layers = quantized_layers(model).values()
    return any(layer.fixed_point for layer in layers) and any(layer.act_bits for layer in layers) \
        and not any(layer.fixed_inputs for layer in layers)


def pin_weight_codes(path: Path, float_path: Path, model: nn.Module) -> int:
    """Replace the int8 export's absmax codes of each <= 8-bit fixed-point layer by the layer's own codes."""
    proto, float_proto = onnx.load(str(path)), onnx.load(str(float_path))
    folded = {t.name: numpy_helper.to_array(t) for t in float_proto.graph.initializer}
    initializers = {t.name: t for t in proto.graph.initializer}
    pinned = 0
    for name, layer in quantized_layers(model).items():
        weight = WRAPPER_PREFIX + name + ".weight"
        if not (layer.fixed_point and fits_int8(layer)) or weight + "_quantized" not in initializers:
            continue
        rows = folded[weight].reshape(folded[weight].shape[0], -1)
        codes, scale = _fixed_point_codes(layer, rows, _per_channel(layer.weight_scale(), rows.shape[0]))
        target = initializers[weight + "_quantized"]
        if tuple(target.dims) != folded[weight].shape:
            raise CifarpressError(f"layer {name!r}: the int8 graph stores its weight as {tuple(target.dims)}, "
                                  f"not {folded[weight].shape}; export it with export_qdq instead")
        target.CopyFrom(numpy_helper.from_array(codes.reshape(folded[weight].shape), target.name))
        initializers[weight + "_scale"].CopyFrom(numpy_helper.from_array(scale, weight + "_scale"))
        pinned += 1
    onnx.checker.check_model(proto)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return pinned


def trained_input_scales(float_path: Path, model: nn.Module) -> dict[str, float]:
    """The activation scale of every int8 layer's input edge in the float graph, as the training used it.

    An edge read by several int8 layers (a block's input, read by its first conv and its shortcut conv) takes
    the widest of their scales, so none of them clips more than it trained with. A layer with no range yet
    (never trained with int8 inputs) is left to the calibrator."""
    layers = quantized_layers(model)
    scales: dict[str, float] = {}
    for node in onnx.load(str(float_path)).graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        layer = layers.get(node.input[1].removeprefix(WRAPPER_PREFIX).removesuffix(".weight"))
        if layer is not None and layer.int8_inputs and fits_int8(layer) and float(layer.act_absmax) > 0:
            scale = float(layer.static_input_scale())
            scales[node.input[0]] = max(scales.get(node.input[0], 0.0), scale)
    return scales


def export_fixed_point_int8_checked(model: nn.Module, onnx_path: str | Path, train: CifarSplit, test: CifarSplit,
                                    calibrator: str | None = None, calib_images: int = 1024, check_images: int = 1000,
                                    extra_metadata: dict | None = None, threads: int | None = None,
                                    max_drop: float | None = None) -> Int8Export:
    model = unwrap(model)
    calibrator = calibrator or TRAINED_RANGE_CALIBRATOR
    layers = quantized_layers(model)
    wide = [name for name, layer in layers.items() if not fits_int8(layer)]
    reference = dequantized_copy(model).eval()  # quantized weights, float inputs: what calibration starts from
    # Per-layer <WL, FL> are in the model file, the packed file and the report, and the graph's scales are the
    # formats' steps: the ONNX names only the layers kept in float, so it costs no more than the int8 export's.
    metadata = {**(extra_metadata or {}), **({"fixed_point_float_layers": wide} if wide else {})}
    manifest = calibration_draw(train, calib_images)
    calib = _calibration_pixels(manifest_images(manifest, train), train.spec.normalizes)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_onnx(reference, Path(tmp) / "float.onnx", train.spec, test.classes, metadata)
        drop: list[float] = []

        def write(target: Path) -> None:
            quantize_onnx_int8(float_path, target, calib, calibrator, manifest=manifest, threads=threads,
                               exclude=wide, pinned_scales=trained_input_scales(float_path, model))
            pin_weight_codes(target, float_path, model)

        def check(target: Path, exact: bool = False):
            result = check_onnx(reference, target, test, check_images, float("inf"), threads, exact=exact)
            if not exact:
                drop.append(_enforce_max_drop(float_path, target, test, check_images, max_drop, calib, calibrator,
                                              threads))
            return result

        path = Path(onnx_path)
        result = publish_checked(path, write, check)
        return Int8Export(path, manifest, result, check_int8_rules(path), check(path, exact=True), drop[0])


__all__ = ["export_fixed_point_int8_checked", "is_fixed_point_int8", "pin_weight_codes", "trained_input_scales"]
