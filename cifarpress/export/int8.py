"""INT8 post-training quantization to a QDQ ONNX graph that TensorRT and onnxruntime both run as int8.

The float export (export_onnx: pixels in [0, 1], normalization inside, BN folded
into the convs) is rewritten with QuantizeLinear/DequantizeLinear following
TensorRT's explicit-quantization rules:
  * symmetric int8 everywhere, zero point 0, no uint8;
  * every Conv/Gemm weight is an int8 initializer with one scale per output
    channel (axis 0) behind a DequantizeLinear; the bias stays float32 (TensorRT
    folds a float bias into its int8 kernels and rejects int32 DequantizeLinear
    inputs; onnxruntime quantizes the bias itself to int32 with scale s_in * s_w);
  * every Conv/Gemm data input, and both inputs of each residual Add, pass
    through Q -> DQ with one calibrated scale per tensor. The network input is
    quantized after the in-graph normalization, i.e. at the first conv's input;
  * the logits (Gemm output) stay float.

Two more choices make onnxruntime's CPU QDQ fusions fire (measured on resnet20:
all 21 convs become QLinearConv, the residual Adds QLinearAdd; without them half
the convs run in float behind dequantized inputs and the graph is slower than
fp32):
  * A conv or residual Add whose only consumer is a ReLU gets a Q -> DQ on its
    output with the ReLU output's scale, giving onnxruntime the DQ -> Conv -> Q
    (and DQ, DQ -> Add -> Q) it fuses; its QDQ rules do not see through a ReLU when
    the zero point is 0. With zero point 0 the pair is exact: quantizing before
    the ReLU and again after it with the same scale gives the codes of quantizing
    after it once, so TensorRT reads the same numbers.
  * Each consumer gets its own Q -> DQ pair, with its own zero-point initializer.
    On x86 onnxruntime converts int8 activations to uint8 (QDQS8ToU8) only where
    a Q feeds exactly one DQ, and its common-subexpression pass would merge
    identical Q nodes back into one.
As written, each ReLU would still run in float in onnxruntime between its DQ and
Q (it folds a ReLU only into a Q whose zero point is the type's minimum): about a
quarter of the int8 time at batch 64. The file stays the TensorRT graph;
cifarpress.runtime.ort_lowering rewrites those chains to uint8 when onnxruntime opens it.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cifarpress.data import DATASETS, CifarSplit, DatasetSpec
from cifarpress.errors import CifarpressError
from cifarpress.export.calibrate import (
    CALIBRATORS,
    INT8_MAX,
    AbsHistogram,
    activation_scale,
    calibration_manifest,
    calibrator_threshold,
    collect_statistics,
    manifest_images,
)
from cifarpress.export.onnx import (
    OPSET,
    ExportCheck,
    ExportCheckError,
    check_indices,
    check_onnx,
    check_pixels,
    export_onnx,
    publish_checked,
)
from cifarpress.export.qdq import _as_pixels
from cifarpress.runtime.ort_lowering import replace_nodes
from cifarpress.utils.io import atomic_write
from cifarpress.utils.modules import unwrap

WEIGHTED_OPS = ("Conv", "Gemm")
ACTIVATIONS_BEFORE_Q = ("Relu",)  # ops that commute with symmetric int8 quantization (see module doc)
INT32_LIMIT = 2 ** 31 - 1


# -- reading the float graph -------------------------------------------------------------

def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(o for node in graph.node if node.op_type == "Constant" for o in node.output)
    return names


def unshare_initializers(graph: onnx.GraphProto) -> int:
    """Replace each Identity of an initializer by its own copy of that initializer; returns how many.

    The TorchScript exporter (our fallback) stores identical tensors once and feeds the other readers
    through Identity nodes (zero-initialized or pruned layers share weights that way). Int8 weights are
    quantized per op, so every weighted op must read an initializer of its own.
    """
    tensors = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    dropped = []
    for node in graph.node:  # topological order: a chain of Identities resolves front to back
        if node.op_type == "Identity" and node.input[0] in tensors and node.output[0] not in outputs:
            own = onnx.TensorProto()
            own.CopyFrom(tensors[node.input[0]])
            own.name = node.output[0]
            graph.initializer.append(own)
            tensors[own.name] = own
            dropped.append(node)
    if dropped:
        replace_nodes(graph, dropped, [])
    return len(dropped)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: node for node in graph.node for o in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[int, int]]]:
    """tensor -> [(node position, input slot)]."""
    found = defaultdict(list)
    for position, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name:
                found[name].append((position, slot))
    return found


def _is_residual_add(node: onnx.NodeProto, constants: set[str]) -> bool:
    return node.op_type == "Add" and len(node.input) == 2 and not (set(node.input) & constants)


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


@dataclass
class Int8Plan:
    """Where the Q/DQ nodes go, by node position in the float graph."""
    weighted: list[int]                  # Conv/Gemm nodes whose weight gets int8 codes
    edges: list[tuple[int, int]]         # (node, input slot) that reads its activation through Q -> DQ
    calibrated: list[str]                # tensors that need a calibrated scale (the edges' tensors)
    before_activation: dict[str, str]    # conv/Add output -> ReLU output whose scale it borrows


def _scope(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from, from the exporter's `namespace` metadata ('' if unknown)."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    scopes = [part.split(":")[0].strip() for part in namespace.split("/")]
    scopes = [s for s in scopes if s.startswith("model")]
    return scopes[-1].removeprefix("model").lstrip(".") if scopes else ""


def int8_layers(graph: onnx.GraphProto) -> dict[int, str]:
    """The ops int8 quantizes, by node position, named as the user knows them: a Conv or Gemm by its PyTorch
    module (its weight 'model.layer1.0.conv1.weight' -> 'layer1.0.conv1'), a residual Add by its block
    ('layer1.0.add'). These are the names `exclude` and the sensitivity sweep use."""
    constants = _constant_names(graph)
    names: dict[int, str] = {}
    taken: Counter = Counter()
    for position, node in enumerate(graph.node):
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[0] not in constants:
            weight = node.input[1]
            name = weight.removeprefix("model.").removesuffix(".weight") if weight.endswith(".weight") else node.name
        elif _is_residual_add(node, constants):
            name = (_scope(node) + ".add").lstrip(".") if _scope(node) else node.name
        else:
            continue
        taken[name] += 1
        names[position] = name if taken[name] == 1 else f"{name}#{taken[name]}"
    return names


def _excluded(node: onnx.NodeProto, name: str, patterns: Collection[str]) -> bool:
    """`patterns` entries match an op type (Conv, Gemm, Add), an ONNX node name, a layer name, or a module
    prefix ending at a dot ('layer3' keeps all of stage 3 in float)."""
    return any(p in (node.op_type, node.name, name) or name.startswith(p + ".") for p in patterns)


def check_exclude(graph: onnx.GraphProto, exclude: Collection[str]) -> None:
    """Every exclude entry must match something: a typo would silently quantize the layer it meant."""
    layers = int8_layers(graph)
    for pattern in exclude:
        if not any(_excluded(graph.node[p], name, [pattern]) for p, name in layers.items()):
            shown = ", ".join(list(layers.values())[:6])
            raise CifarpressError(f"exclude: '{pattern}' matches no quantized layer; give an op type (Conv, Gemm, "
                                  f"Add), a layer name or a module prefix (layers here: {shown}, ...)")


def plan_int8(graph: onnx.GraphProto, fuse_for_onnxruntime: bool = True,
              exclude: Collection[str] = ()) -> Int8Plan:
    """Read the float graph: the weighted ops, the activation edges to quantize, the pre-ReLU pairs.

    exclude: layers kept in float (see _excluded), as onnxruntime's and modelopt's nodes_to_exclude."""
    constants = _constant_names(graph)
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    initializers = {t.name for t in graph.initializer}
    names = int8_layers(graph) if exclude else {}
    weighted, edges = [], []
    for position, node in enumerate(graph.node):
        if exclude and position in names and _excluded(node, names[position], exclude):
            continue
        if node.op_type in WEIGHTED_OPS:
            if len(node.input) < 2 or node.input[1] not in initializers:
                raise CifarpressError(f"{node.op_type} node {node.name!r} has no weight initializer; "
                                      f"int8 export needs weights stored in the graph")
            if node.input[0] in constants:
                continue
            weighted.append(position)
            edges.append((position, 0))
        elif _is_residual_add(node, constants):
            edges += [(position, 0), (position, 1)]
    calibrated = sorted({graph.node[p].input[s] for p, s in edges})
    calibrated_set = set(calibrated)
    quantized_ops = {graph.node[p].output[0] for p, _ in edges if graph.node[p].op_type in ("Conv", "Add")}
    before_activation = {}
    for node in graph.node if fuse_for_onnxruntime else []:
        source = node.input[0] if node.input else None
        if (node.op_type in ACTIVATIONS_BEFORE_Q and node.output[0] in calibrated_set and source in quantized_ops
                and len(consumers[source]) == 1 and source not in outputs):
            before_activation[source] = node.output[0]
    return Int8Plan(weighted, edges, calibrated, before_activation)


# -- writing the QDQ graph ----------------------------------------------------------------

def quantize_weight(weight: np.ndarray, per_channel: bool = True,
                    min_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes in [-127, 127], float32 scale per output channel) for a weight with channels on axis 0.

    per_channel=False uses one absmax scale, repeated per channel so the graph has
    the same form. An all-zero channel gets scale 1 (its codes are 0 whatever it is)."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.float32)
    absmax = np.abs(rows).max(axis=1) if per_channel else np.full(len(rows), np.abs(rows).max())
    scale = np.where(absmax > 0, absmax / np.float32(INT8_MAX), np.float32(1.0)).astype(np.float32)
    if min_scale is not None:
        scale = np.maximum(scale, min_scale.astype(np.float32))
    codes = np.clip(np.rint(rows / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes.reshape(weight.shape), scale


def _bias_safe_scale(bias: np.ndarray | None, input_scale: float) -> np.ndarray | None:
    """Smallest weight scale per channel that keeps onnxruntime's int32 bias (b / (s_in * s_w)) in range."""
    if bias is None:
        return None
    return (np.abs(bias.astype(np.float64)) / (input_scale * INT32_LIMIT) * 2).astype(np.float32)


class _QdqWriter:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.pairs = 0
        self.initializers: list[TensorProto] = []

    def scale(self, tensor: str, value: float) -> str:
        name = f"{tensor}_scale"
        self.initializers.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def pair(self, tensor: str, scale_name: str) -> tuple[list[onnx.NodeProto], str]:
        """Q -> DQ nodes for `tensor` with a zero point of its own; returns (nodes, dequantized name)."""
        self.pairs += 1
        k = self.pairs
        zero_point = f"{tensor}_zero_point_{k}"
        self.initializers.append(numpy_helper.from_array(np.zeros((), np.int8), zero_point))
        quantized, dequantized = f"{tensor}_quantized_{k}", f"{tensor}_dequantized_{k}"
        return [helper.make_node("QuantizeLinear", [tensor, scale_name, zero_point], [quantized],
                                 name=f"{tensor}_quantize_{k}"),
                helper.make_node("DequantizeLinear", [quantized, scale_name, zero_point], [dequantized],
                                 name=f"{tensor}_dequantize_{k}")], dequantized


def quantize_int8_graph(proto: onnx.ModelProto, plan: Int8Plan, scales: dict[str, float],
                        per_channel: bool = True) -> None:
    """Rewrite, in place, the float graph `plan` was made from into the int8 QDQ form."""
    graph = proto.graph
    missing = [t for t in plan.calibrated if t not in scales]
    if missing:
        raise CifarpressError(f"no activation scale for {missing[:3]}")
    initializers = {t.name: t for t in graph.initializer}
    writer = _QdqWriter(graph)
    scale_names = {t: writer.scale(t, scales[t]) for t in plan.calibrated}
    before, after, weight_nodes = defaultdict(list), defaultdict(list), []

    # A layer called twice in the forward (one conv applied twice) gives ops that read one weight initializer:
    # it is quantized once (a scale safe for every reader's bias) and each reader gets its own DequantizeLinear
    # of those shared codes, so every op is the DQ -> Conv unit that TensorRT and onnxruntime fuse.
    readers = defaultdict(list)
    for position in plan.weighted:
        readers[graph.node[position].input[1]].append(graph.node[position])
    for weight_name, nodes in readers.items():
        weight = numpy_helper.to_array(initializers[weight_name])
        layouts = set()
        for node in nodes:
            if node.op_type == "Gemm" and _attribute(node, "transA", 0):
                raise CifarpressError(f"Gemm {node.name!r} has transA=1; int8 export takes linear layers only")
            layouts.add((node.op_type, _attribute(node, "transB", 0)))
        if len(layouts) > 1:
            raise CifarpressError(f"layer {weight_name.removeprefix('model.').removesuffix('.weight')!r} reads its "
                                  f"weight both as is and transposed; int8 export needs one layout per weight "
                                  f"(keep it in float with exclude)")
        if layouts == {("Gemm", 0)}:  # put output channels on axis 0, as TensorRT wants
            weight = weight.T
            for node in nodes:
                _set_attribute(node, "transB", 1)
        safe = [_bias_safe_scale(numpy_helper.to_array(initializers[node.input[2]]), scales[node.input[0]])
                for node in nodes if len(node.input) > 2 and node.input[2]]
        codes, scale = quantize_weight(weight, per_channel, np.max(safe, axis=0) if safe else None)
        quantized = f"{weight_name}_quantized"
        writer.initializers += [numpy_helper.from_array(codes, quantized),
                                numpy_helper.from_array(scale, f"{weight_name}_scale"),
                                numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{weight_name}_zero_point")]
        for k, node in enumerate(nodes):
            suffix = f"_{k + 1}" if k else ""
            node.input[1] = f"{weight_name}_dequantized{suffix}"
            weight_nodes.append(helper.make_node(
                "DequantizeLinear", [quantized, f"{weight_name}_scale", f"{weight_name}_zero_point"],
                [node.input[1]], name=f"{weight_name}_dequantize{suffix}", axis=0))
    still_read = {name for node in graph.node for name in node.input}  # a reader kept in float (exclude) keeps it
    replaced = [name for name in readers if name not in still_read]
    for name in replaced:
        graph.initializer.remove(initializers.pop(name))

    for position, slot in plan.edges:
        node = graph.node[position]
        tensor = node.input[slot]
        nodes, node.input[slot] = writer.pair(tensor, scale_names[tensor])
        before[position] += nodes

    consumers = _consumers(graph)
    producers = {o: p for p, node in enumerate(graph.node) for o in node.output}
    for source, activation_output in plan.before_activation.items():
        (consumer, slot), = consumers[source]
        nodes, graph.node[consumer].input[slot] = writer.pair(source, scale_names[activation_output])
        after[producers[source]] += nodes

    for value in [v for v in graph.input if v.name in replaced]:
        graph.input.remove(value)  # older IRs list initializers as inputs too
    graph.initializer.extend(writer.initializers)
    ordered = list(weight_nodes)
    for position, node in enumerate(graph.node):
        ordered += before[position] + [node] + after[position]
    del graph.node[:]
    graph.node.extend(ordered)


# -- the export ------------------------------------------------------------------------

def _calibration_pixels(images: torch.Tensor | CifarSplit | np.ndarray, pixel_range: bool = True) -> np.ndarray:
    """The calibration images as float32 graph inputs. pixel_range: the graph normalizes inside, so they must be
    pixels in [0, 1] (a graph that takes the model's own inputs, spec.normalizes False, takes any values)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    pixels = _as_pixels(images)
    if pixels.dim() != 4:
        raise CifarpressError(f"calibration images must be NCHW, got shape {tuple(pixels.shape)}")
    if len(pixels) == 0:
        raise CifarpressError("no calibration images")
    low, high = float(pixels.min()), float(pixels.max())
    if pixel_range and (low < -1e-3 or high > 1 + 1e-3):
        raise CifarpressError(f"calibration images span [{low:.2f}, {high:.2f}]; pass uint8 images or float "
                              f"pixels in [0, 1] (the graph normalizes inside), not normalized tensors")
    return pixels.numpy().astype(np.float32)


def _normalizes_inside(metadata: dict) -> bool:
    """Whether a cifarpress graph takes pixels in [0, 1] (normalizing inside) rather than the model's own inputs."""
    try:
        preprocessing = json.loads(metadata.get("preprocessing", "{}"))
    except ValueError:
        return True
    return preprocessing.get("scale") != "none"


def _manifest_summary(manifest: dict | None) -> dict | None:
    if manifest is None:
        return None
    return {k: manifest[k] for k in ("dataset", "split", "count", "seed") if k in manifest} | (
        {"file": manifest["file"]} if "file" in manifest else {})


def export_int8_qdq(model: nn.Module, onnx_path: str | Path, spec: DatasetSpec, classes: list[str],
                    calib_images: torch.Tensor | CifarSplit | np.ndarray, calibrator: str = "entropy",
                    per_channel: bool = True, manifest: dict | None = None, source: str | None = None,
                    statistics: dict[str, AbsHistogram] | None = None, extra_metadata: dict | None = None,
                    fuse_for_onnxruntime: bool = True, threads: int | None = None, opset: int = OPSET) -> Path:
    """Write `model` (float, trained on normalized inputs) as an int8 QDQ ONNX file, atomically.

    Exports the float graph, then quantize_onnx_int8 (its arguments are documented there).
    """
    if calibrator not in CALIBRATORS:
        raise CifarpressError(f"unknown calibrator '{calibrator}'; choose one of {', '.join(CALIBRATORS)}")
    pixels = _calibration_pixels(calib_images, spec.normalizes)  # before the export: bad images fail fast
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_onnx(unwrap(model), Path(tmp) / "float.onnx", spec, classes, extra_metadata, opset)
        return quantize_onnx_int8(float_path, onnx_path, pixels, calibrator, per_channel, manifest, source,
                                  statistics, fuse_for_onnxruntime, threads)


def quantize_onnx_int8(float_path: str | Path, onnx_path: str | Path,
                       calib_images: torch.Tensor | CifarSplit | np.ndarray, calibrator: str = "entropy",
                       per_channel: bool = True, manifest: dict | None = None, source: str | None = None,
                       statistics: dict[str, AbsHistogram] | None = None, fuse_for_onnxruntime: bool = True,
                       threads: int | None = None, exclude: Collection[str] = (),
                       pinned_scales: dict[str, float] | None = None) -> Path:
    """Post-training int8 of a float cifarpress ONNX file (pixels in [0, 1] in, normalization inside) into a
    QDQ file at `onnx_path`, atomically; the file's metadata is kept and the quantization recorded beside it.

    calib_images: uint8 NCHW, float NCHW pixels in [0, 1], or a CifarSplit.
    calibrator: minmax | percentile | entropy | mse. manifest: the calibration
    manifest the images came from (recorded in the metadata), or `source` to
    describe them otherwise (e.g. "zeroq"). statistics: histograms already
    collected on the same export (collect_statistics), to try several calibrators
    without observing again. fuse_for_onnxruntime=False leaves out the exact
    pre-ReLU Q/DQ pairs (module doc): the plain TensorRT placement, which
    onnxruntime runs mostly in float. exclude: layers kept in float, by op type,
    layer name or module prefix (int8_layers names them; `check_exclude`). pinned_scales: activation
    scales fixed in advance for some calibrated tensors (a quantization-aware model's trained ranges),
    used instead of the calibrator's for those tensors.
    """
    if calibrator not in CALIBRATORS:
        raise CifarpressError(f"unknown calibrator '{calibrator}'; choose one of {', '.join(CALIBRATORS)}")
    proto = onnx.load(str(float_path))
    metadata = {p.key: p.value for p in proto.metadata_props}
    if "normalization" not in metadata.get("preprocessing", ""):
        raise CifarpressError(f"{float_path} is not a cifarpress export (no preprocessing metadata); int8 "
                              f"calibration needs a graph that takes pixels in [0, 1] and normalizes inside")
    pixels = _calibration_pixels(calib_images, _normalizes_inside(metadata))
    if "quantization" in metadata or any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        raise CifarpressError(f"{float_path} is already quantized; int8 calibration takes a float graph")
    quantization = {
        "scheme": "int8", "method": "post-training, static",
        "format": "QDQ (TensorRT explicit quantization)",
        "weights": "int8 symmetric, " + ("per output channel (axis 0)" if per_channel else "per tensor"),
        "activations": "int8 symmetric per tensor, zero point 0", "bias": "float32",
        "pre_relu_pairs": fuse_for_onnxruntime,
        "calibrator": calibrator, "calibration": {"images": len(pixels), "manifest": _manifest_summary(manifest),
                                                   "source": source or ("manifest" if manifest else "images")}}
    unshare_initializers(proto.graph)
    check_exclude(proto.graph, exclude)
    if exclude:
        layers = int8_layers(proto.graph)
        quantization["float_layers"] = [n for p, n in layers.items() if _excluded(proto.graph.node[p], n, exclude)]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "quantization", json.dumps(quantization)
    plan = plan_int8(proto.graph, fuse_for_onnxruntime, exclude)
    if statistics is None or any(t not in statistics for t in plan.calibrated):
        statistics = collect_statistics(float_path, plan.calibrated, pixels,
                                        histograms=calibrator != "minmax", threads=threads)
    pinned = {t: v for t, v in (pinned_scales or {}).items() if t in plan.calibrated}
    scales = {t: pinned[t] if t in pinned else activation_scale(calibrator_threshold(statistics[t], calibrator))
              for t in plan.calibrated}
    quantize_int8_graph(proto, plan, scales, per_channel)
    onnx.checker.check_model(proto)
    return atomic_write(onnx_path, lambda tmp: onnx.save(proto, tmp))


@dataclass
class Int8Export:
    path: Path
    manifest: dict               # the calibration draw (class-balanced training indices)
    check: ExportCheck           # onnxruntime int8 on this host's kernels vs the float model
    violations: list[str]        # of TensorRT's explicit-quantization rules; [] when it follows them
    graph_check: ExportCheck | None = None  # the file's own QDQ math (what TensorRT builds) vs the float model
    top1_drop_pp: float | None = None       # float minus int8 (graph math) top-1 on the check images


def _exact_top1(path: str | Path, pixels: torch.Tensor, labels: np.ndarray, threads: int | None) -> float:
    from cifarpress.runtime.ort import onnx_predictions  # bench imports this package

    return 100.0 * float((onnx_predictions(path, pixels, threads, exact=True) == labels).mean())


def int8_sensitivity(float_path: str | Path, calib_images, images: torch.Tensor, labels: np.ndarray,
                     calibrator: str = "entropy", threads: int | None = None,
                     statistics: dict[str, AbsHistogram] | None = None) -> list[dict]:
    """Top-1 (pp) lost on `images` when each quantizable layer alone is int8 and the rest stay float, in the
    graph's own math; worst first. One calibration pass serves every layer."""
    proto = onnx.load(str(float_path))
    pixels = _calibration_pixels(calib_images, _normalizes_inside({p.key: p.value for p in proto.metadata_props}))
    unshare_initializers(proto.graph)
    layers = int8_layers(proto.graph)
    if statistics is None:
        plan = plan_int8(proto.graph)
        statistics = collect_statistics(float_path, plan.calibrated, pixels, histograms=calibrator != "minmax",
                                        threads=threads)
    base = _exact_top1(float_path, images, labels, threads)
    ranking = []
    with tempfile.TemporaryDirectory() as tmp:
        for position, name in layers.items():
            node = proto.graph.node[position]
            others = [n for p, n in layers.items() if p != position]
            alone = quantize_onnx_int8(float_path, Path(tmp) / "one.onnx", pixels, calibrator, statistics=statistics,
                                       threads=threads, exclude=others)
            ranking.append({"layer": name, "op": node.op_type,
                            "top1_drop_pp": base - _exact_top1(alone, images, labels, threads)})
    return sorted(ranking, key=lambda r: -r["top1_drop_pp"])


def _enforce_max_drop(float_path: Path, int8_path: Path, test: CifarSplit, check_images: int, max_drop: float | None,
                      calib_pixels: np.ndarray, calibrator: str, threads: int | None) -> float:
    """Float minus int8 top-1 on the check images, in the graph's own math (the same on every CPU, and what
    TensorRT builds); above max_drop the export fails naming the layers that lose most when quantized alone."""
    indices = check_indices(test, check_images)
    pixels, labels = test.pixels(indices), test.labels[indices].numpy()
    drop = _exact_top1(float_path, pixels, labels, threads) - _exact_top1(int8_path, pixels, labels, threads)
    if max_drop is not None and drop > max_drop:
        worst = int8_sensitivity(float_path, calib_pixels, pixels, labels, calibrator, threads)[:3]
        named = ", ".join(f"{w['layer']} ({w['top1_drop_pp']:+.2f} pp alone)".replace("(+", "(-") for w in worst)
        raise ExportCheckError(
            f"int8 loses {drop:.2f} pp top-1 on {len(labels)} test images, more than max_drop {max_drop:g}; "
            f"the layers that lose most: {named}; keep them in float with exclude: "
            f"[{', '.join(w['layer'] for w in worst[:2])}] (or --exclude)")
    return drop


def calibration_draw(train: CifarSplit, count: int) -> dict:
    """The calibration images, as a manifest (manifest_images reads them): a class-balanced draw of a CIFAR
    training split, or the first `count` images of a sample of a user's data (its loader's order)."""
    count = min(count, len(train))
    if train.spec.name in DATASETS and train.images.dtype == torch.uint8:
        return calibration_manifest(train.spec.name, train.labels, count)
    return {"dataset": train.spec.name, "split": "user data", "count": count, "indices": list(range(count))}


def export_int8_checked(model: nn.Module, onnx_path: str | Path, train: CifarSplit, test: CifarSplit,
                        calibrator: str = "entropy", calib_images: int = 1024, check_images: int = 1000,
                        extra_metadata: dict | None = None, threads: int | None = None,
                        exclude: Collection[str] = (), max_drop: float | None = None) -> Int8Export:
    """export_int8_qdq calibrated on a class-balanced draw of training images, then compared with the float
    model through onnxruntime on test images (no tolerance: int8 differs by design, the check records by how
    much; but above `max_drop` pp of top-1 lost it fails) and checked against TensorRT's rules. The command
    line and recipes both export int8 through this."""
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_onnx(unwrap(model), Path(tmp) / "float.onnx", train.spec, test.classes, extra_metadata)
        return _quantize_checked(float_path, onnx_path, train, test, calibrator, calib_images, check_images, threads,
                                 exclude, max_drop, torch_model=model)


def quantize_onnx_int8_checked(float_path: str | Path, onnx_path: str | Path, train: CifarSplit, test: CifarSplit,
                               calibrator: str = "entropy", calib_images: int = 1024, check_images: int = 1000,
                               threads: int | None = None, exclude: Collection[str] = (),
                               max_drop: float | None = None) -> Int8Export:
    """export_int8_checked for a float ONNX file without its PyTorch model: the reference is the float file."""
    return _quantize_checked(Path(float_path), onnx_path, train, test, calibrator, calib_images, check_images,
                             threads, exclude, max_drop)


def _quantize_checked(float_path: Path, onnx_path: str | Path, train: CifarSplit, test: CifarSplit, calibrator: str,
                      calib_images: int, check_images: int, threads: int | None, exclude: Collection[str],
                      max_drop: float | None, torch_model: nn.Module | None = None) -> Int8Export:
    from cifarpress.runtime.ort import onnx_logits  # bench imports this package

    manifest = calibration_draw(train, calib_images)
    calib = _calibration_pixels(manifest_images(manifest, train), train.spec.normalizes)
    pixels = check_pixels(test, check_images)  # the images check_onnx compares on
    reference = None if torch_model is not None else onnx_logits(float_path, pixels, threads)
    drop: list[float] = []

    def check(tmp: Path, exact: bool = False) -> ExportCheck:
        if torch_model is not None:
            result = check_onnx(torch_model, tmp, test, check_images, float("inf"), threads, exact=exact)
        else:
            got = onnx_logits(tmp, pixels, threads, exact=exact)
            if not (np.isfinite(reference).all() and np.isfinite(got).all()):
                raise ExportCheckError(f"{float_path} or its int8 graph gives NaN or infinite logits; the model "
                                       f"is broken (diverged training?): retrain it with a lower learning rate")
            result = ExportCheck(len(pixels), float(np.abs(reference - got).max()),
                                 100.0 * float((reference.argmax(1) == got.argmax(1)).mean()))
        if not exact:  # checked before the file is published: a failed max_drop leaves nothing behind
            drop.append(_enforce_max_drop(float_path, tmp, test, check_images, max_drop, calib, calibrator, threads))
        return result

    path = Path(onnx_path)
    result = publish_checked(path, lambda tmp: quantize_onnx_int8(float_path, tmp, calib, calibrator, manifest=manifest,
                                                                  threads=threads, exclude=exclude), check)
    return Int8Export(path, manifest, result, check_int8_rules(path), check(path, exact=True), drop[0])


# -- TensorRT explicit-quantization rules ------------------------------------------------------

def check_int8_rules(model: str | Path | onnx.ModelProto) -> list[str]:
    """Violations of TensorRT's explicit-quantization rules in a QDQ graph; [] when it follows them all."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = _constant_names(graph)
    producers = _producers(graph)
    problems = []

    def constant(name: str) -> np.ndarray | None:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(_attribute(node, "value"))
        return None

    def made_by(name: str, op: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        return node if node is not None and node.op_type == op else None

    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        zero_point = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            problems.append(f"{label} has no constant zero point (an absent one means uint8)")
        elif zero_point.dtype != np.int8:
            problems.append(f"{label} zero point is {zero_point.dtype}, not int8")
        elif np.any(zero_point != 0):
            problems.append(f"{label} has a non-zero zero point (TensorRT takes symmetric quantization only)")
        scale = constant(node.input[1])
        if scale is None or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{label} scale must be a constant positive float")
        if node.op_type == "DequantizeLinear":
            data = constant(node.input[0])
            if data is not None and data.dtype != np.int8:
                problems.append(f"{label} dequantizes {data.dtype} data, not int8")
            source = made_by(node.input[0], "QuantizeLinear")
            if data is None and source is None:
                problems.append(f"{label} does not follow a QuantizeLinear (Q/DQ must come in pairs)")
            elif source is not None and scale is not None:
                q_scale = constant(source.input[1])
                if q_scale is None or q_scale.shape != scale.shape or not np.allclose(q_scale, scale, rtol=0):
                    problems.append(f"{label} uses another scale than its QuantizeLinear")

    for node in graph.node:
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.op_type in WEIGHTED_OPS and (made_by(node.input[0], "DequantizeLinear") is None and len(node.input) > 1
                                             and made_by(node.input[1], "DequantizeLinear") is None):
            continue  # a layer kept in float (exclude): TensorRT runs it in float or fp16, which is allowed
        if node.op_type in WEIGHTED_OPS:
            data = made_by(node.input[0], "DequantizeLinear")
            if data is None:
                problems.append(f"{label} data input is not dequantized (needs Q -> DQ in front)")
            else:
                scale = constant(data.input[1])
                if scale is not None and scale.size != 1:
                    problems.append(f"{label} data input is quantized per channel; activations must be per tensor")
            weight = made_by(node.input[1], "DequantizeLinear") if len(node.input) > 1 else None
            if weight is None:
                problems.append(f"{label} weight is not an int8 initializer behind DequantizeLinear")
            else:
                codes, scale = constant(weight.input[0]), constant(weight.input[1])
                if codes is None or codes.dtype != np.int8:
                    problems.append(f"{label} weight codes are not a constant int8 tensor")
                elif node.op_type == "Gemm" and (_attribute(node, "transB", 0) != 1 or _attribute(node, "transA", 0)):
                    problems.append(f"{label} must use transB=1 so that output channels lie on the weight's axis 0")
                elif scale is not None and (scale.ndim != 1 or scale.size != codes.shape[0]
                                            or _attribute(weight, "axis", 1) != 0):
                    problems.append(f"{label} weight is not quantized per output channel on axis 0")
            if len(node.input) > 2 and node.input[2] and made_by(node.input[2], "DequantizeLinear") is not None:
                problems.append(f"{label} bias is dequantized; keep it float (TensorRT folds a float bias)")
        elif _is_residual_add(node, constants):
            if all(made_by(name, "DequantizeLinear") is None for name in node.input):
                continue  # a float Add (excluded)
            for slot, name in enumerate(node.input):
                if made_by(name, "DequantizeLinear") is None:
                    problems.append(f"{label} (residual) input {slot} is not dequantized; both inputs need Q -> DQ")

    for output in graph.output:
        node = producers.get(output.name)
        if node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.append(f"graph output {output.name!r} comes out of {node.op_type}; the logits must stay float")
        if output.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"graph output {output.name!r} is not float32")
    return problems


def describe_int8(path: str | Path) -> dict:
    """The quantization metadata of an int8 export."""
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    return json.loads(meta.get("quantization", "{}"))
