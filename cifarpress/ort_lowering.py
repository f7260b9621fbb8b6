"""Lower a TensorRT-style int8 QDQ graph for onnxruntime's CPU kernels, at load time.

TensorRT's explicit quantization wants symmetric int8 (zero point 0), so our
int8 export writes each ReLU as

    Conv -> Q(s, int8, 0) -> DQ -> Relu -> Q(s, int8, 0) -> DQ -> consumers

onnxruntime fuses DQ -> Conv -> Q into QLinearConv, but it folds a ReLU into a Q
only when the zero point is the type's minimum, so every ReLU above runs as
three float passes (DQ, Relu, Q): about a quarter of ResNet-56's int8 time at
batch 64. With zero point 0, "quantize, ReLU, quantize again with the same
scale" is the same as quantizing once into uint8 with zero point 0, which
clamps negatives to 0. So the chain becomes

    Conv -> Q(s, uint8, 0) -> DQ -> consumers

which onnxruntime runs as one QLinearConv with the ReLU folded in. The only
difference is at the top: int8 saturates at 127*s, uint8 at 255*s, so values
beyond the calibrated range are kept rather than clipped.

A second rewrite serves weight-only QDQ graphs (ternary models without
quantized activations): there a DequantizeLinear of a constant feeds a float
Conv, which onnxruntime cannot fuse into a quantized kernel, and because the
weight is no longer a constant it also skips the blocked-layout (NCHWc) convs:
the ternary ResNet-20 ran 2.4x slower than fp32. fold_weight_dequantize turns
such a DequantizeLinear into the float initializer it computes (exactly the
same values), which restores the float graph's speed; the compute stays float.

The file on disk stays the TensorRT graph; cifarpress applies this when it
opens a session (cifarpress.bench). Imports onnx and numpy only.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper


def fold_relu_chains(proto: onnx.ModelProto) -> int:
    """Rewrite every Q(int8, 0) -> DQ -> Relu -> Q(same scale, int8, 0) -> DQ chain in place; returns how many."""
    graph = proto.graph
    constants = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(constants[name]) if name in constants else None

    def symmetric_int8(node: onnx.NodeProto) -> np.ndarray | None:
        """The scale of a Q/DQ node with an int8 zero point of 0, else None."""
        if len(node.input) < 3:
            return None  # no zero point means uint8 by the ONNX default
        scale, zero = constant(node.input[1]), constant(node.input[2])
        if scale is None or zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            return None
        return scale

    def only_consumer(name: str, op: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op and name not in graph_outputs else None

    dropped: list[onnx.NodeProto] = []
    new_zero_points: dict[str, onnx.TensorProto] = {}
    folded = 0
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        dq_in = producers.get(relu.input[0])
        if dq_in is None or dq_in.op_type != "DequantizeLinear" or only_consumer(dq_in.output[0], "Relu") is None:
            continue
        q_in = producers.get(dq_in.input[0])
        if (q_in is None or q_in.op_type != "QuantizeLinear"
                or only_consumer(q_in.output[0], "DequantizeLinear") is None):
            continue
        scale = symmetric_int8(q_in)
        if scale is None or scale.size != 1 or not np.array_equal(symmetric_int8(dq_in), scale):
            continue
        q_outs = consumers.get(relu.output[0], [])
        if not q_outs or relu.output[0] in graph_outputs:
            continue
        same_scale = lambda node: np.array_equal(symmetric_int8(node), scale)  # noqa: E731
        if not all(q.op_type == "QuantizeLinear" and same_scale(q) for q in q_outs):
            continue
        dq_outs = [dq for q in q_outs for dq in consumers.get(q.output[0], [])]
        if (any(dq.op_type != "DequantizeLinear" or not same_scale(dq) or dq.output[0] in graph_outputs
                for dq in dq_outs) or any(q.output[0] in graph_outputs for q in q_outs)):
            continue
        zero_name = q_in.input[2] + "_uint8"
        new_zero_points[zero_name] = numpy_helper.from_array(np.zeros((), dtype=np.uint8), zero_name)
        q_in.input[2] = dq_in.input[2] = zero_name
        for dq in dq_outs:
            for user in consumers.get(dq.output[0], []):
                for slot, name in enumerate(user.input):
                    if name == dq.output[0]:
                        user.input[slot] = dq_in.output[0]
        dropped += [relu, *q_outs, *dq_outs]
        folded += 1
    if folded:
        replace_nodes(graph, dropped, list(new_zero_points.values()))
    return folded


def replace_nodes(graph: onnx.GraphProto, dropped: list[onnx.NodeProto],
                  initializers: list[onnx.TensorProto]) -> None:
    """Drop the `dropped` nodes, add `initializers`, and remove initializers no one reads."""
    # By identity: equal nodes may appear twice. `dropped` holds the wrappers alive, so their ids stay theirs.
    gone = {id(n) for n in dropped}
    kept = [n for n in graph.node if id(n) not in gone]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(initializers)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)


WEIGHT_SLOT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def fold_weight_dequantize(proto: onnx.ModelProto) -> int:
    """Replace each DequantizeLinear of constants that only feeds float ops' weights by its float result.

    Left alone where the op's activation input comes from a DequantizeLinear too: that pair is what
    onnxruntime fuses into an integer kernel (QLinearConv), so the weight must stay quantized there.
    """
    graph = proto.graph
    constants = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, slot))
    graph_outputs = {o.name for o in graph.output}

    def float_weight_reader(node: onnx.NodeProto, slot: int) -> bool:
        if WEIGHT_SLOT.get(node.op_type) != slot:
            return False
        activation = producers.get(node.input[0])
        return activation is None or activation.op_type != "DequantizeLinear"

    folded, dropped = [], []
    for node in graph.node:
        if (node.op_type != "DequantizeLinear" or not all(name in constants for name in node.input if name)
                or node.output[0] in graph_outputs):
            continue
        users = consumers.get(node.output[0], [])
        if not users or not all(float_weight_reader(user, slot) for user, slot in users):
            continue
        quantized = numpy_helper.to_array(constants[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
        zero = (numpy_helper.to_array(constants[node.input[2]]).astype(np.float32)
                if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        if scale.ndim == 1 and scale.size > 1:  # per-axis: broadcast along `axis` (default 1)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % quantized.ndim
            shape = [1] * quantized.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        folded.append(numpy_helper.from_array(((quantized - zero) * scale).astype(np.float32), node.output[0]))
        dropped.append(node)
    if folded:
        replace_nodes(graph, dropped, folded)
    return len(folded)


def lower_file(path: str | Path) -> tuple[bytes | None, dict]:
    """The serialized lowered model (None when nothing in it needs lowering: float graphs) and what was
    rewritten: {"relu_chains": folded into uint8, "weights": DequantizeLinears folded into float constants}."""
    proto = onnx.load(str(path))
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return None, {"relu_chains": 0, "weights": 0}
    counts = {"relu_chains": fold_relu_chains(proto), "weights": fold_weight_dequantize(proto)}
    return (proto.SerializeToString() if any(counts.values()) else None), counts


def lowered_bytes(path: str | Path) -> bytes | None:
    """The serialized lowered model, or None when nothing in it needs lowering (float graphs)."""
    return lower_file(path)[0]


def lowering_counts(path: str | Path) -> dict:
    """What cifarpress rewrites when onnxruntime opens the file (see lower_file; both 0 for float graphs)."""
    return lower_file(path)[1]


def folded_relu_count(path: str | Path) -> int:
    """How many ReLU chains of the file cifarpress folds when onnxruntime opens it (0 for float graphs)."""
    return lowering_counts(path)["relu_chains"]


@contextlib.contextmanager
def lowered_path(path: str | Path) -> Iterator[Path]:
    """A path to the lowered model for a separate process: a temporary copy, or `path` itself if unchanged."""
    data = lowered_bytes(path)
    if data is None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="cifarpress-ort-") as tmp:
        lowered = Path(tmp) / Path(path).name
        lowered.write_bytes(data)
        yield lowered
