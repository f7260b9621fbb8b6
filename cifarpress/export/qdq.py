"""ONNX export of a fake-quant model (ternary or n-bit weights) with explicit QuantizeLinear/DequantizeLinear.

Every quantized layer's weight is stored as an int8 initializer with a float32
scale per output channel (axis 0) and an int8 zero point of 0, and it reaches its
Conv/Gemm through DequantizeLinear. A Linear applied to token tensors (B, N, C)
exports as MatMul with its weight transposed, (in, out): its codes keep that
layout and the scale lies on axis 1, still one per output channel. TensorRT's
explicit quantization accepts this form. Ternary layers hold only the integers -1, 0 and 1; a b-bit layer holds
integers in [-qmax, qmax], qmax = 2^(b-1) - 1, so int8 storage fits every width up
to 8 bits (kept int8 layers use all of [-127, 127]). Wider codes do not fit an
int8 graph: a layer above 8 bits stays a float layer holding its dequantized
weights (exact in fp32 for fixed point up to 24-bit words; fp32 in ONNX, fp16 in
a TensorRT engine built with FP16). A per-tensor scale is repeated once per
channel. A fixed-point layer's scale is its step 2^-FL, so the format is exact in
int8 storage.

With act_bits=8, the input of each int8 layer also passes through
QuantizeLinear -> DequantizeLinear, using the layer's static per-tensor scale
(running absmax / 127). ONNX and TensorRT need constant scales, so per-sample
training exports per tensor too, and PyTorch evaluation uses the same scale.
A layer whose inputs are rounded to its own fixed-point format <b, f> (AdaPT)
gets Mul(2^f) -> Round -> Clip(+-qmax) -> Mul(2^-f) in front instead: Round is half-to-even in ONNX as in torch.round, and scaling by a power
of two is exact, so the graph rounds as PyTorch does.

How it is built: export_onnx traces a float copy of the model whose layers hold
the dequantized weights, so no quantizer ops are traced. The graph is then
rewritten. torch.onnx's optimizer folds each eval-mode BatchNorm into the conv
before it, giving W * gamma / sigma per output channel. Codes on a symmetric grid
times a per-channel factor are still codes on that grid, with scale
s * |gamma / sigma| per channel, so the codes are read back from the folded
weights. Ternary layers take the sign (it flips where gamma < 0), and the scale
is exact. n-bit layers re-derive absmax codes at their own qmax: the largest
|code| of an absmax grid is qmax, so magnitude / qmax is the folded scale. Layers
with no BN after them, such as the classifier, keep PyTorch's codes and scales
unchanged. Fixed-point layers keep PyTorch's codes (their largest code need not be
qmax) and read each channel's folded scale back by least squares, checked exactly.
"""
from __future__ import annotations

import copy
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from cifarpress.data import CifarSplit, DatasetSpec
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import (
    OPSET,
    ExportCheck,
    ExportCheckError,
    NormalizedClassifier,
    compare_with_onnxruntime,
    export_onnx,
    relative_tolerance,
)
from cifarpress.runtime.onnx_file import read_onnx_metadata
from cifarpress.runtime.ort import make_session
from cifarpress.techniques.quantize.ternary import (
    FakeQuantLayer,
    _replace_module,
    config_from_model,
    quantized_layers,
)
from cifarpress.utils.io import atomic_write
from cifarpress.utils.modules import unwrap

WRAPPER_PREFIX = "model."  # export_onnx wraps the net as NormalizedClassifier(model=...)
QDQ_MAX_BITS = 8  # the widest code an int8 initializer holds
WEIGHT_ONLY_TOLERANCE = 1e-4  # max |logit difference| when activations stay float, x max(1, |logit|)
ACT_RELATIVE_TOLERANCE = 0.02  # with int8 activations: share of the largest |logit| (see check_qdq)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float copy of `model` in which each quantized layer is a plain layer holding its dequantized weights."""
    twin = copy.deepcopy(unwrap(model)).cpu()  # export_onnx traces on the CPU
    for name, layer in quantized_layers(twin).items():
        _replace_module(twin, name, layer.to_float())
    return twin


def _per_channel(scale: torch.Tensor, channels: int) -> np.ndarray:
    return scale.detach().float().cpu().reshape(-1).expand(channels).numpy().copy()


def fits_int8(layer: FakeQuantLayer) -> bool:
    """Whether the layer's codes fit an int8 initializer (ternary or at most 8 bits); wider ones export float."""
    return layer.bits <= QDQ_MAX_BITS  # ternary's 1.58 included


def _fixed_point_codes(layer: FakeQuantLayer, rows: np.ndarray, torch_scale: np.ndarray) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """PyTorch's codes, each channel's scale read back from the BN-folded rows (codes x scale, exactly)."""
    codes = layer.weight_codes().cpu().numpy().reshape(rows.shape[0], -1).astype(np.float64)
    weight = rows.astype(np.float64)
    energy = (codes * codes).sum(axis=1)
    factor = np.where(energy > 0, (codes * weight).sum(axis=1) / np.where(energy > 0, energy, 1), torch_scale)
    codes = codes * np.sign(np.where(factor == 0, 1, factor))[:, None]
    scale = np.abs(factor).astype(np.float32)
    if not np.allclose(codes * scale[:, None], weight, rtol=1e-5, atol=1e-12 + 1e-6 * np.abs(weight).max()):
        raise CifarpressError(f"the exporter changed layer {layer.layer_name!r}'s fixed-point weights beyond a "
                              f"per-channel scale; export with the dynamo exporter (torch>=2.5) and report this")
    return codes.astype(np.int8), np.where(scale > 0, scale, torch_scale).astype(np.float32)


def _weight_codes(layer: FakeQuantLayer, exported: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes in [-qmax, qmax], per-channel float32 scale) reproducing the exported weight `exported`
    of a layer that fits int8 (quantize_graph leaves wider ones float)."""
    channels, qmax = exported.shape[0], layer.qmax
    torch_scale = _per_channel(layer.weight_scale(), channels)
    if np.array_equal(exported, layer.quantized_weight().cpu().numpy()):  # no BN folded in
        return layer.weight_codes().cpu().numpy().astype(np.int8), torch_scale
    rows = exported.reshape(channels, -1)
    if layer.fixed_point:
        codes, scale = _fixed_point_codes(layer, rows, torch_scale)
        return codes.reshape(exported.shape), scale
    magnitude = np.abs(rows).max(axis=1)
    if layer.ternary:
        codes = np.sign(rows)
        if not np.array_equal(codes * magnitude[:, None], rows):
            raise CifarpressError(f"the exporter changed layer {layer.layer_name!r} into non-ternary weights; "
                                  f"export with the dynamo exporter (torch>=2.5) and report this as a bug")
        scale = magnitude
    else:
        scale = (magnitude / np.float32(qmax)).astype(np.float32)
        codes = np.clip(np.rint(rows / np.where(magnitude > 0, scale, 1)[:, None]), -qmax, qmax)
    # An all-zero channel (gamma = 0) still needs a positive scale; the codes make it irrelevant.
    scale = np.where(magnitude > 0, scale, torch_scale).astype(np.float32)
    return codes.reshape(exported.shape).astype(np.int8), scale


def _check_weight_consumers(name: str, weight: str, nodes: list, transposed: bool = False) -> None:
    for node in nodes:
        gemm_transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        plain = node.op_type == "MatMul" if transposed else node.op_type == "Conv" or gemm_transposed
        if list(node.input).index(weight) != 1 or not plain:
            raise CifarpressError(f"layer {name!r} exported as {node.op_type}, not Conv/Gemm(transB=1)/MatMul; "
                                  f"QDQ export needs plain conv and linear layers")


def _transposed_weight(name: str, layer: FakeQuantLayer, initializers: dict, consumers: dict) -> str | None:
    """The initializer holding the layer's weight transposed, read by MatMul as its weight; None if none.

    An nn.Linear applied to a (B, N, C) token tensor exports as MatMul(x, W^T) + bias, with W^T folded into a
    new initializer (named by the exporter, not by the layer), so it is recognised by its value: the exported
    copy holds the dequantized weight (no BN folds into a MatMul; to float rounding, as the copy computed it
    on the CPU). Where two layers hold the same values, the MatMul that the exporter's scope metadata places
    in this layer wins."""
    expected = layer.quantized_weight().detach().float().cpu().numpy().T
    if expected.ndim != 2:
        return None
    close = 1e-6 * max(float(np.abs(expected).max()), 1e-30)
    found = [tensor for tensor, t in initializers.items()
             if tuple(t.dims) == expected.shape and consumers[tensor]
             and all(n.op_type == "MatMul" and list(n.input).index(tensor) == 1 for n in consumers[tensor])
             and np.allclose(numpy_helper.to_array(t), expected, rtol=0, atol=close)]
    scope = f"/{WRAPPER_PREFIX}{name}:"
    found.sort(key=lambda tensor: not any(scope in p.value for n in consumers[tensor] for p in n.metadata_props
                                          if p.key == "namespace"))
    return found[0] if found else None


def _input_qdq(layer: FakeQuantLayer, name: str, node, graph) -> list:
    """Q -> DQ nodes in front of `node`'s data input, using the layer's static per-tensor scale."""
    scale_name, zero_name = f"{name}.input_scale", f"{name}.input_zero_point"
    scale = layer.static_input_scale().detach().float().cpu().numpy().reshape(())
    graph.initializer.extend([numpy_helper.from_array(scale, scale_name),
                              numpy_helper.from_array(np.zeros((), np.int8), zero_name)])
    source, quantized, dequantized = node.input[0], f"{name}.input_quantized", f"{name}.input_dequantized"
    node.input[0] = dequantized
    return [helper.make_node("QuantizeLinear", [source, scale_name, zero_name], [quantized],
                             name=f"{name}.input_quantize"),
            helper.make_node("DequantizeLinear", [quantized, scale_name, zero_name], [dequantized],
                             name=f"{name}.input_dequantize")]


def _input_rounding(layer: FakeQuantLayer, name: str, node, graph) -> list:
    """Mul -> Round -> Clip -> Mul in front of `node`'s data input: the layer's fixed-point input rounding."""
    qmax, frac = float(layer.qmax), layer.frac_bits
    constants = {"up": np.float32(2.0 ** frac), "down": np.float32(2.0 ** -frac), "low": np.float32(-qmax),
                 "high": np.float32(qmax)}
    graph.initializer.extend([numpy_helper.from_array(np.asarray(v), f"{name}.input_fixed_{k}")
                              for k, v in constants.items()])
    source, out = node.input[0], f"{name}.input_fixed"
    node.input[0] = out + "_value"
    return [helper.make_node("Mul", [source, f"{name}.input_fixed_up"], [out + "_scaled"], name=out + "_scale"),
            helper.make_node("Round", [out + "_scaled"], [out + "_rounded"], name=out + "_round"),
            helper.make_node("Clip", [out + "_rounded", f"{name}.input_fixed_low", f"{name}.input_fixed_high"],
                             [out + "_codes"], name=out + "_clip"),
            helper.make_node("Mul", [out + "_codes", f"{name}.input_fixed_down"], [out + "_value"],
                             name=out + "_descale")]


def quantize_graph(proto: onnx.ModelProto, layers: dict[str, FakeQuantLayer]) -> None:
    """Rewrite, in place, a float export of `dequantized_copy(model)` into the QDQ form: int8 weights for the
    layers that fit int8, input rounding for fixed-point inputs; wider layers stay as exported (float)."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for value in node.input:
            consumers[value].append(node)
    weight_dequantizers, before_node, replaced = [], defaultdict(list), set()
    for name, layer in layers.items():
        stem = weight = WRAPPER_PREFIX + name + ".weight"
        transposed = weight not in initializers
        if transposed:  # a Linear on token tensors: MatMul reads W^T (see _transposed_weight)
            weight = _transposed_weight(name, layer, {k: t for k, t in initializers.items() if k not in replaced},
                                        consumers)
        if weight is None:
            dynamo = any(p.key == "namespace" for n in graph.node for p in n.metadata_props)  # the fallback has none
            why = ("QDQ export needs conv and linear layers whose weights the graph stores" if dynamo else
                   "torch.onnx's dynamo exporter could not trace the model, and its TorchScript fallback renames "
                   "folded weights")
            raise CifarpressError(f"layer {name!r} has no weight initializer in the exported graph (neither its "
                                  f"own nor a transposed copy read by MatMul); {why}")
        tensor = initializers[weight]
        _check_weight_consumers(name, weight, consumers[weight], transposed)
        if layer.fixed_inputs:
            for i, node in enumerate(consumers[weight]):
                before_node[id(node)] += _input_rounding(layer, name if i == 0 else f"{name}.{i}", node, graph)
        if not fits_int8(layer):
            continue
        exported = numpy_helper.to_array(tensor)
        codes, scale = _weight_codes(layer, exported.T if transposed else exported)
        graph.initializer.remove(tensor)
        replaced.add(weight)
        graph.initializer.extend([  # a transposed weight keeps its (in, out) layout: output channels on axis 1
            numpy_helper.from_array(np.ascontiguousarray(codes.T) if transposed else codes, stem + "_quantized"),
            numpy_helper.from_array(scale, stem + "_scale"),
            numpy_helper.from_array(np.zeros(len(scale), np.int8), stem + "_zero_point"),
        ])
        weight_dequantizers.append(helper.make_node(
            "DequantizeLinear", [stem + "_quantized", stem + "_scale", stem + "_zero_point"], [weight],
            name=stem + "_dequantize", axis=1 if transposed else 0))
        if layer.int8_inputs:
            for i, node in enumerate(consumers[weight]):
                before_node[id(node)] += _input_qdq(layer, name if i == 0 else f"{name}.{i}", node, graph)
    for value in [v for v in graph.input if v.name in replaced]:  # older IRs also list initializers as inputs
        graph.input.remove(value)
    ordered = list(weight_dequantizers)
    for node in graph.node:
        ordered += before_node.get(id(node), []) + [node]
    del graph.node[:]
    graph.node.extend(ordered)


def export_qdq(model: nn.Module, path: str | Path, spec: DatasetSpec, classes: list[str],
               extra_metadata: dict | None = None, opset: int = OPSET) -> Path:
    """Write the fake-quant `model` as a QDQ ONNX file (input: pixels in [0, 1]), atomically."""
    model = unwrap(model)
    layers = quantized_layers(model)
    if not layers:
        raise CifarpressError("the model has no ternary or int8 layers; quantize it (quantize_model or TernaryQAT) "
                              "before export_qdq, or use export_onnx for a float model")
    for layer in layers.values():  # fail early, naming the layer, before any tracing
        if layer.int8_inputs:
            layer.static_input_scale()  # a missing activation range
    config = config_from_model(model)
    precisions = {n: m.precision + (f".{m.frac_bits}" if m.fixed_point else "") + ("" if fits_int8(m) else " (float)")
                  for n, m in layers.items()}
    if set(precisions.values()) <= {"ternary", "int8"}:
        scheme = "BitNet b1.58 ternary weights, int8 QDQ"
    elif any(m.fixed_point for m in layers.values()):
        scheme = "per-layer fixed-point weights <WL.FL>: int8 QDQ up to 8 bits, float above"
    else:
        scheme = "ternary and n-bit weights in int8 storage, int8 QDQ"
    metadata = {"quantization": {
        "scheme": scheme, "layers": precisions,
        "config": config.to_dict(), "activations": "int8 per tensor, static" if config.act_bits else "float"},
        **(extra_metadata or {})}
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_onnx(dequantized_copy(model), Path(tmp) / "float.onnx", spec, classes, metadata, opset)
        proto = onnx.load(str(float_path))
    quantize_graph(proto, layers)
    onnx.checker.check_model(proto)
    return atomic_write(path, lambda tmp: onnx.save(proto, tmp))


def _as_pixels(images: torch.Tensor | CifarSplit) -> torch.Tensor:
    if isinstance(images, CifarSplit):
        images = images.images
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def check_qdq(model: nn.Module, path: str | Path, images: torch.Tensor | CifarSplit,
              tolerance: float | None = None, threads: int | None = None,
              runtime_optimizations: bool = False) -> ExportCheck:
    """Compare onnxruntime on the QDQ file with the PyTorch fake-quant model (eval mode) on `images`.

    `images`: uint8 NCHW (0-255), float NCHW in [0, 1], or a CifarSplit. The
    normalization is read from the file's metadata. Raises ExportCheckError when
    the logits differ by more than `tolerance` x max(1, the largest |logit|) (relative,
    as check_onnx's: float rounding grows with the logits).

    By default onnxruntime runs the graph as written (graph optimizations off),
    which checks the file's own semantics. runtime_optimizations=True runs it as
    bench deploys it: onnxruntime then quantizes each conv bias to int32 with scale
    s_input * s_weight, as int8 engines do. With int8 inputs that moves the logits
    by about 1% of their range and can flip near-tied predictions. With float
    inputs it changes nothing measurable.

    Default tolerance: 1e-4 (relative) when the inputs stay float, where the graph computes
    what PyTorch computes up to float rounding (about 1e-7 on resnet20). With int8
    inputs it is 2% of the largest |logit|. PyTorch applies BN after the conv, while
    the graph has BN folded into it, so the two differ by an ulp. That ulp can move
    an activation across a rounding boundary and flip its int8 code by one step.
    Such flips cost a fraction of a percent of the logit range, while a wrong scale
    or axis costs tens of percent.
    """
    meta = read_onnx_metadata(path)
    try:
        preprocessing = json.loads(meta["preprocessing"])
    except (KeyError, ValueError):
        raise CifarpressError(f"{path} has no cifarpress preprocessing metadata; export it with export_qdq") from None
    model = unwrap(model)
    was_training = model.training
    wrapped = NormalizedClassifier(model, preprocessing["mean"], preprocessing["std"]).eval()
    x = _as_pixels(images)
    session = make_session(path, threads, optimize=runtime_optimizations)
    try:
        check, largest_logit = compare_with_onnxruntime(wrapped, session, x)
    finally:
        model.train(was_training)
    max_diff = check.max_abs_diff
    if tolerance is None:
        # A rounded input (int8 or fixed point) can flip by one step where BN folding moves a value by an ulp.
        rounded_inputs = any(layer.int8_inputs or layer.fixed_inputs for layer in quantized_layers(model).values())
        allowed = (ACT_RELATIVE_TOLERANCE * largest_logit if rounded_inputs
                   else relative_tolerance(WEIGHT_ONLY_TOLERANCE, largest_logit))
    else:
        allowed = relative_tolerance(tolerance, largest_logit)
    if max_diff > allowed:
        raise ExportCheckError(
            f"onnxruntime output of {path} differs from the PyTorch fake-quant model by {max_diff:.2e} "
            f"(> {allowed:.1e}, largest |logit| {largest_logit:.3g}) on {len(x)} images, top-1 agreement "
            f"{check.top1_agreement:.2f}%; the QDQ export is not faithful")
    return check
