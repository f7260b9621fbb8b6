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

ReLU6 (MobileNetV2) is exported as Conv -> Clip(0, 6) -> Q(s, int8, 0) -> DQ: the
Clip sits between the Conv and its Q, so onnxruntime cannot fuse the Conv at all
and the int8 file ran 2x slower than fp32. fold_clip_quantize drops the Clip and
quantizes into uint8 with zero point 0 and scale min(s, 6/255) instead: uint8
saturation then does the clipping exactly (its range [0, 255 * scale] lies inside
[0, 6]). Where 255 * s <= 6 the codes are the int8 graph's up to 127 and go on to
255 rather than saturating (every value at least as close to the float ReLU6);
otherwise the grid becomes the finer 6/255 over exactly [0, 6] (the worst error
drops from s/2 to 3/255, though single values may round differently).

A third rewrite serves weight-only QDQ graphs (ternary models without
quantized activations): there a DequantizeLinear of a constant feeds a float
Conv, which onnxruntime cannot fuse into a quantized kernel, and because the
weight is no longer a constant it also skips the blocked-layout (NCHWc) convs:
the ternary ResNet-20 ran 2.4x slower than fp32. fold_weight_dequantize turns
such a DequantizeLinear into the float initializer it computes (exactly the
same values), which restores the float graph's speed; the compute stays float.

A fourth rewrite depends on the host: onnxruntime's x86 int8 kernels without
VNNI (AVX2 only) add pairs of u8 x s8 products in saturating int16 lanes, so
full-range int8 weights can clip (ResNet-56's int8 file scored 86.9% there
against 88.6% for its own QDQ math). reduce_weight_range requantizes the
integer kernels' weights into [-64, 64] per channel, with which no pair sum
can exceed int16 (onnxruntime's quantizer calls this reduce_range); the kernels
then compute exactly the lowered graph. It runs where cifarpress.runtime.host finds no
VNNI-class instruction, or when asked (`cifarpress lower --reduce-range`).

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


class _GraphIndex:
    """Who produces and who reads each tensor, and the constant values, of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.constants = {t.name: t for t in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.constants[name]) if name in self.constants else None

    def symmetric_int8(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The scale of a Q/DQ node with an int8 zero point of 0, else None."""
        if len(node.input) < 3:
            return None  # no zero point means uint8 by the ONNX default
        scale, zero = self.constant(node.input[1]), self.constant(node.input[2])
        if scale is None or zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            return None
        return scale


def fold_relu_chains(proto: onnx.ModelProto) -> int:
    """Rewrite every Q(int8, 0) -> DQ -> Relu -> Q(same scale, int8, 0) -> DQ chain in place; returns how many."""
    graph = proto.graph
    index = _GraphIndex(graph)
    producers, consumers, graph_outputs = index.producers, index.consumers, index.graph_outputs
    symmetric_int8 = index.symmetric_int8

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


def fold_clip_quantize(proto: onnx.ModelProto) -> int:
    """Rewrite every Clip(0, c) -> Q(s, int8, 0) -> DQ as Q(min(s, c/255), uint8, 0) -> DQ in place; returns how many.

    Needs every reader of the Clip to be such a Q (not a graph output: its type changes), and every reader of
    those Qs a DQ with the same scale and zero point, which get the new ones too.
    """
    graph = proto.graph
    index = _GraphIndex(graph)
    dropped: list[onnx.NodeProto] = []
    new_constants: dict[str, onnx.TensorProto] = {}
    for clip in [n for n in graph.node if n.op_type == "Clip"]:
        names = list(clip.input[1:3]) + [""] * (3 - len(clip.input))
        bounds = [index.constant(name) if name else None for name in names]
        if any(b is None or b.size != 1 for b in bounds):
            continue  # a bound missing, computed at run time, or given as (pre-opset-11) attributes
        low, high = (float(b.reshape(())) for b in bounds)
        if low != 0.0 or not 0.0 < high < np.inf or clip.output[0] in index.graph_outputs:
            continue
        qs = index.consumers.get(clip.output[0], [])
        if not qs or any(q.op_type != "QuantizeLinear" or q.output[0] in index.graph_outputs for q in qs):
            continue
        scale = index.symmetric_int8(qs[0])
        if scale is None or scale.size != 1:
            continue
        same = lambda node: np.array_equal(index.symmetric_int8(node), scale)  # noqa: E731
        dqs = [dq for q in qs for dq in index.consumers.get(q.output[0], [])]
        if not all(same(q) for q in qs) or not dqs or any(dq.op_type != "DequantizeLinear" or not same(dq)
                                                          for dq in dqs):
            continue
        # The uint8 range [0, 255 * new_scale] must lie inside [0, high] for saturation to do the Clip.
        new_scale = np.float32(min(float(scale.reshape(())), high / 255.0))
        scale_name, zero_name = f"{clip.output[0]}_uint8_scale", f"{clip.output[0]}_uint8_zero_point"
        new_constants[scale_name] = numpy_helper.from_array(np.array(new_scale, dtype=scale.dtype), scale_name)
        new_constants[zero_name] = numpy_helper.from_array(np.zeros((), dtype=np.uint8), zero_name)
        for node in (*qs, *dqs):
            node.input[1], node.input[2] = scale_name, zero_name
        for q in qs:
            q.input[0] = clip.input[0]
        dropped.append(clip)
    if dropped:
        replace_nodes(graph, dropped, list(new_constants.values()))
    return len(dropped)


def merge_shared_quantize(proto: onnx.ModelProto) -> int:
    """Merge QuantizeLinears of one tensor with equal parameters into one, in place, and store every symmetric int8
    activation read by several DequantizeLinears as uint8 with zero point 128; returns how many Qs were merged.

    The export puts a Q/DQ pair on each edge (TensorRT's convention), so a tensor read twice, like MobileNetV2's
    residual sum feeding both the next block and the next sum, gets two identical Qs; onnxruntime then fuses
    neither the Add nor the convolutions around it. Merged, one Q feeds several DQs, and onnxruntime's own int8 ->
    uint8 conversion (its x86 kernels want uint8 activations) takes only one-to-one Q -> DQ pairs, so the shared
    pair is converted here. Both steps are exact: Q is deterministic, and int8 with zero point 0 and uint8 with
    zero point 128 hold the same values with the same saturation.
    """
    graph = proto.graph
    index = _GraphIndex(graph)

    def value(name: str) -> tuple | None:
        array = index.constant(name) if name else None
        return None if array is None else (array.dtype.str, array.shape, array.tobytes())

    groups: dict[tuple, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] in index.graph_outputs:
            continue
        params = tuple(value(name) for name in node.input[1:])
        if None in params:
            continue  # a scale or zero point computed at run time
        groups.setdefault((node.input[0], params, tuple(a.SerializeToString() for a in node.attribute)), []).append(node)
    zero_128 = numpy_helper.from_array(np.array(128, dtype=np.uint8), "shared_activation_uint8_zero_point")
    dropped: list[onnx.NodeProto] = []
    converted = False
    for first, *others in groups.values():
        dqs = [dq for q in (first, *others) for dq in index.consumers.get(q.output[0], [])]
        scale = index.symmetric_int8(first)
        # Only where the shared pair can then be stored as uint8: a merged Q that stayed int8 would fuse worse.
        if (len(dqs) < 2 or scale is None or scale.size != 1
                or not all(dq.op_type == "DequantizeLinear" and np.array_equal(index.symmetric_int8(dq), scale)
                           for dq in dqs)):
            continue
        for dq in dqs:
            dq.input[0], dq.input[2] = first.output[0], zero_128.name
        first.input[2] = zero_128.name
        dropped += others
        converted = True
    if converted:
        replace_nodes(graph, dropped, [zero_128])
    return len(dropped)


WEIGHT_SLOT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def fold_weight_dequantize(proto: onnx.ModelProto) -> int:
    """Replace each DequantizeLinear of constants that only feeds float ops' weights by its float result.

    Left alone where the op's activation input comes from a DequantizeLinear too: that pair is what
    onnxruntime fuses into an integer kernel (QLinearConv), so the weight must stay quantized there.
    """
    graph = proto.graph
    index = _GraphIndex(graph)

    def float_weight_reader(node: onnx.NodeProto, name: str) -> bool:
        """`node` reads `name` only as the weight of a float op."""
        if any(read == name and slot != WEIGHT_SLOT.get(node.op_type) for slot, read in enumerate(node.input)):
            return False
        activation = index.producers.get(node.input[0])
        return activation is None or activation.op_type != "DequantizeLinear"

    folded, dropped = [], []
    for node in graph.node:
        if (node.op_type != "DequantizeLinear" or not all(name in index.constants for name in node.input if name)
                or node.output[0] in index.graph_outputs):
            continue
        users = index.consumers.get(node.output[0], [])
        if not users or not all(float_weight_reader(user, node.output[0]) for user in users):
            continue
        quantized = index.constant(node.input[0]).astype(np.float32)
        scale = index.constant(node.input[1]).astype(np.float32)
        zero = (index.constant(node.input[2]).astype(np.float32)
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


# The widest weight code that cannot saturate a u8 x s8 pair sum in int16: 2 * 255 * 64 = 32,640 <= 32,767.
REDUCED_WEIGHT_MAX = 64


def reduce_weight_range(proto: onnx.ModelProto) -> int:
    """Requantize every int8 weight that an integer kernel will read into [-64, 64] (7 bits); returns how many.

    For CPUs without VNNI (cifarpress.runtime.host): their u8 x s8 kernels add pairs of products in saturating int16,
    which full-range int8 weights overflow (ResNet-56 lost 1.7 pp that way), while 7-bit weights never do, so the
    kernels then compute exactly what the graph says. Each output channel keeps its own range: the new scale is
    max|code| * s / 64 and the codes are rounded to it (about one bit of weight precision is lost, nothing else).
    Run after fold_weight_dequantize, so the weights left quantized are exactly those of integer kernels.
    """
    graph = proto.graph
    index = _GraphIndex(graph)
    replaced, new_constants = 0, []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in index.constants:
            continue
        codes = index.constant(node.input[0])
        users = index.consumers.get(node.output[0], [])
        if (codes.dtype != np.int8 or not users or len(node.input) < 2 or node.input[1] not in index.constants
                or not all(WEIGHT_SLOT.get(u.op_type) is not None and u.input[WEIGHT_SLOT[u.op_type]] == node.output[0]
                           for u in users)):
            continue
        zero = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is not None and np.any(zero != 0):
            continue  # our exports write symmetric weights only
        scale = index.constant(node.input[1]).astype(np.float32)
        values = codes.astype(np.float32)
        if scale.size > 1:  # per output channel, along `axis` (default 1)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % codes.ndim
            peak = np.abs(values).max(axis=tuple(d for d in range(codes.ndim) if d != axis))
            shape = [1] * codes.ndim
            shape[axis] = -1
        else:
            peak, shape = np.abs(values).max(keepdims=False), None
        if np.all(peak <= REDUCED_WEIGHT_MAX):
            continue
        ratio = np.maximum(peak, REDUCED_WEIGHT_MAX) / REDUCED_WEIGHT_MAX  # >= 1: channels already narrow keep theirs
        ratio_b = ratio.reshape(shape) if shape else ratio
        new_codes = np.clip(np.rint(values / ratio_b), -REDUCED_WEIGHT_MAX, REDUCED_WEIGHT_MAX).astype(np.int8)
        new_scale = (scale * ratio).astype(np.float32).reshape(scale.shape)
        codes_name, scale_name = node.input[0] + "_7bit", node.input[1] + "_7bit"
        new_constants += [numpy_helper.from_array(new_codes, codes_name), numpy_helper.from_array(new_scale, scale_name)]
        node.input[0], node.input[1] = codes_name, scale_name
        replaced += 1
    if replaced:
        replace_nodes(graph, [], new_constants)
    return replaced


# In this order: the ReLU and Clip folds read the int8 pairs as the export wrote them.
LOWERINGS = (("relu_chains", fold_relu_chains), ("clip_chains", fold_clip_quantize),
             ("merged_quantize", merge_shared_quantize), ("weights", fold_weight_dequantize))
# Only on hosts whose int8 kernels saturate (see cifarpress.runtime.host), after the rest.
HOST_LOWERINGS = (("weights_7bit", reduce_weight_range),)


def default_reduce_range() -> bool:
    from cifarpress.runtime.host import int8_kernels_exact

    return not int8_kernels_exact()


def lower_file(path: str | Path, reduce_range: bool | None = None) -> tuple[bytes | None, dict]:
    """lower_file_uncached, remembered per file state: one bench of a file opens it several times (accuracy,
    its graph math, latency, the lowering record), and parsing and rewriting a graph is not free."""
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, reduce_range)
    if key not in _LOWERED:
        while len(_LOWERED) >= 8:  # a few files' worth: a compare run's files, not every file ever opened
            _LOWERED.pop(next(iter(_LOWERED)))
        _LOWERED[key] = lower_file_uncached(path, reduce_range)
    data, counts = _LOWERED[key]
    return data, dict(counts)


_LOWERED: dict[tuple, tuple[bytes | None, dict]] = {}


def lower_file_uncached(path: str | Path, reduce_range: bool | None = None) -> tuple[bytes | None, dict]:
    """The serialized lowered model (None when nothing in it needs lowering: float graphs) and what was
    rewritten: {"relu_chains": int8 ReLU chains folded into uint8, "clip_chains": ReLU6 Clips folded into a uint8
    quantization, "merged_quantize": duplicate QuantizeLinears merged, "weights": DequantizeLinears folded into
    float constants, "weights_7bit": integer kernels' weights requantized to 7 bits}.

    reduce_range: requantize weights to 7 bits (reduce_weight_range); None = when this host's int8 kernels
    saturate (no VNNI)."""
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    proto = onnx.load(str(path))
    steps = LOWERINGS + (HOST_LOWERINGS if reduce_range else ())
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return None, {name: 0 for name, _ in LOWERINGS + HOST_LOWERINGS}
    counts = {name: rewrite(proto) for name, rewrite in steps}
    counts.update({name: 0 for name, _ in HOST_LOWERINGS if name not in counts})
    return (proto.SerializeToString() if any(counts.values()) else None), counts


def lowered_bytes(path: str | Path, reduce_range: bool | None = None) -> bytes | None:
    """The serialized lowered model, or None when nothing in it needs lowering (float graphs)."""
    return lower_file(path, reduce_range)[0]


def lowering_counts(path: str | Path, reduce_range: bool | None = None) -> dict:
    """What cifarpress rewrites when onnxruntime opens the file (see lower_file; all 0 for float graphs)."""
    return lower_file(path, reduce_range)[1]


def folded_relu_count(path: str | Path) -> int:
    """How many ReLU chains of the file cifarpress folds when onnxruntime opens it (0 for float graphs)."""
    return lowering_counts(path)["relu_chains"]


@contextlib.contextmanager
def lowered_path(path: str | Path, reduce_range: bool | None = None) -> Iterator[Path]:
    """A path to the lowered model for a separate process: a temporary copy, or `path` itself if unchanged."""
    data = lowered_bytes(path, reduce_range)
    if data is None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="cifarpress-ort-") as tmp:
        lowered = Path(tmp) / Path(path).name
        lowered.write_bytes(data)
        yield lowered
