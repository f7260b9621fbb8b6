"""Fold the constant branches of an exported float graph into per-channel constants.

When pruning cuts a residual branch whole (prune stage, `remove_branches`), its block
computes shortcut + constant. torch exports that constant the way the stand-in layers
compute it (cifarpress.layers): zeros of the activation's shape (ConstantOfShape, or the
bias through Expand), then the branch's BatchNorm over that full tensor, then the Add.
onnxruntime cannot fold it at load time because the shape comes from the batch, so every
call built and normalized a full-size tensor: in the pruned ResNet-56 at batch 64 that
was about an eighth of its fp32 kernel time (bench/ort_op_profile.py). Here the constant
is computed once, per channel, and the Add broadcasts it.

The rewrite is checked by running both graphs in onnxruntime at two batch sizes; if the
outputs differ in shape or value, the graph is left as it was.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ort_lowering import replace_nodes

TERMINALS = {"Add", "Sub", "Mul"}  # where the folded constant meets a real activation


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


class _Constants:
    def __init__(self, graph: onnx.GraphProto):
        self.values = {t.name: t for t in graph.initializer}
        self.nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}

    def get(self, name: str) -> np.ndarray | None:
        if name in self.values:
            return numpy_helper.to_array(self.values[name])
        node = self.nodes.get(name)
        value = _attribute(node, "value") if node is not None else None
        return numpy_helper.to_array(value) if value is not None else None


def _apply(node: onnx.NodeProto, source: str, value: np.ndarray, constants: _Constants) -> np.ndarray | None:
    """`node` computed on the constant `value` (which it reads as `source`), or None if it is not an op of
    constants alone."""
    others = [name for name in node.input if name and name != source]
    params = [constants.get(name) for name in others]
    if any(p is None for p in params):
        return None
    if node.op_type == "Identity":
        return value
    if node.op_type == "Relu":
        return np.maximum(value, 0)
    if node.op_type == "Clip":
        low = constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        high = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return np.clip(value, -np.inf if low is None else low, np.inf if high is None else high)
    if node.op_type == "BatchNormalization" and node.input[0] == source and not _attribute(node, "training_mode", 0):
        scale, bias, mean, var = (p.reshape(-1, 1, 1) for p in params)  # channels on axis 1 of NCHW
        return (value - mean) / np.sqrt(var + _attribute(node, "epsilon", 1e-5)) * scale + bias
    if node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2 and len(params) == 1:
        left, right = (value, params[0]) if node.input[0] == source else (params[0], value)
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[node.op_type](left, right)
    return None


def _start_value(node: onnx.NodeProto, constants: _Constants) -> np.ndarray | None:
    """The constant a ConstantOfShape fills with, or the constant an Expand broadcasts (float only)."""
    if node.op_type == "ConstantOfShape":
        filler = _attribute(node, "value")
        value = numpy_helper.to_array(filler).reshape(()) if filler is not None else np.zeros((), np.float32)
    elif node.op_type == "Expand":
        value = constants.get(node.input[0])
    else:
        return None
    return value if value is not None and value.dtype.kind == "f" else None


def _drop_dead(graph: onnx.GraphProto, initializers: list[onnx.TensorProto]) -> None:
    """Add `initializers`, then remove every node whose outputs nobody reads, and unread initializers."""
    dead: list[onnx.NodeProto] = []
    alive = list(graph.node)
    while True:
        read = {name for node in alive for name in node.input} | {o.name for o in graph.output}
        gone = [node for node in alive if not any(out in read for out in node.output)]
        if not gone:
            break
        dead += gone
        alive = [node for node in alive if all(node is not g for g in gone)]
    replace_nodes(graph, dead, initializers)


def fold_constant_branches(proto: onnx.ModelProto) -> int:
    """Replace, in place, each chain "ConstantOfShape / Expand of a constant -> per-channel ops of constants
    (BatchNormalization, Relu, Clip, Add/Sub/Mul/Div by constants)" that ends in an Add/Sub/Mul with a real
    activation by one broadcast constant; returns how many."""
    graph = proto.graph
    constants = _Constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    folded: list[onnx.TensorProto] = []
    for start in list(graph.node):
        value0 = _start_value(start, constants)
        if value0 is None or start.output[0] in graph_outputs:
            continue
        for first in consumers.get(start.output[0], []):
            source, node, value = start.output[0], first, value0
            while (computed := _apply(node, source, value, constants)) is not None:
                source, value = node.output[0], computed
                users = consumers.get(source, [])
                if len(users) != 1 or source in graph_outputs:
                    node = None
                    break
                node = users[0]
            if node is None or node.op_type not in TERMINALS:
                continue
            other = [name for name in node.input if name != source]
            if len(other) != 1 or constants.get(other[0]) is not None:
                continue
            name = f"{source}_folded"
            folded.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
            node.input[list(node.input).index(source)] = name
    if folded:
        _drop_dead(graph, folded)
    return len(folded)


def fold_if_equivalent(proto: onnx.ModelProto, input_shape: tuple[int, ...], seed: int = 0) -> int:
    """fold_constant_branches, kept only if onnxruntime gives the same outputs (shapes and values, batch 1 and 3)
    before and after; returns how many were folded (0 when reverted)."""
    import onnxruntime as ort

    original = proto.SerializeToString()
    count = fold_constant_branches(proto)
    if not count:
        return 0
    rng = np.random.default_rng(seed)

    def run(model: bytes, x: np.ndarray) -> list[np.ndarray]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 1, 3
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})

    folded = proto.SerializeToString()
    try:
        for batch in (1, 3):
            x = rng.random((batch, *input_shape), dtype=np.float32)
            for before, after in zip(run(original, x), run(folded, x), strict=True):
                if before.shape != after.shape or not np.allclose(before, after, rtol=1e-5, atol=1e-5):
                    raise ValueError("the folded graph computes something else")
    except Exception:  # noqa: BLE001  any failure keeps the graph as exported; its own check reports real problems
        proto.ParseFromString(original)
        return 0
    return count
