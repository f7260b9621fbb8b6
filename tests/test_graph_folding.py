"""Constant branches of an exported graph folded into per-channel constants (cifarpress.graph_folding)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cifarpress.graph_folding import fold_constant_branches, fold_if_equivalent


def _graph(branch: list[onnx.NodeProto], initializers: list[onnx.TensorProto], channels: int = 4,
           size: int = 3) -> onnx.ModelProto:
    """y = x + branch(ConstantOfShape(shape of x)), as torch exports a pruned residual branch."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                              value=numpy_helper.from_array(np.zeros(1, np.float32))),
             *branch, helper.make_node("Add", ["x", branch[-1].output[0] if branch else "zeros"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", channels, size, size]) for n in "xy"]
    return helper.make_model(helper.make_graph(nodes, "branch", io[:1], io[1:], initializers),
                             opset_imports=[helper.make_opsetid("", 18)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_batchnorm_and_relu_of_zeros_become_one_constant():
    rng = np.random.default_rng(0)
    params = {name: rng.random(4, dtype=np.float32) + 0.5 for name in ("scale", "bias", "mean", "var")}
    params["bias"] -= 1.0  # some channels negative, so the ReLU matters
    inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
    branch = [helper.make_node("BatchNormalization", ["zeros", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-3),
              helper.make_node("Relu", ["bn"], ["act"])]
    proto = _graph(branch, inits)
    x = rng.standard_normal((5, 4, 3, 3), dtype=np.float32)
    before = _run(proto, x)
    assert fold_constant_branches(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Add"]  # Shape and ConstantOfShape went with the branch
    onnx.checker.check_model(proto)
    constant = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == proto.graph.node[0].input[1]))
    expected = np.maximum((0 - params["mean"]) / np.sqrt(params["var"] + 1e-3) * params["scale"] + params["bias"], 0)
    np.testing.assert_allclose(constant.reshape(-1), expected, rtol=1e-6)
    np.testing.assert_allclose(_run(proto, x), before, rtol=1e-6, atol=1e-6)


def test_a_fold_that_would_change_the_output_shape_is_reverted():
    """Add(x, Expand(c, bigger shape)) broadcasts x up; Add(x, c) would not: onnxruntime shows it, nothing changes."""
    nodes = [helper.make_node("Expand", ["c", "big"], ["expanded"]), helper.make_node("Add", ["x", "expanded"], ["y"])]
    inits = [numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(4, 1, 1), "c"),
             numpy_helper.from_array(np.array([1, 4, 2, 2], np.int64), "big")]
    graph = helper.make_graph(nodes, "widen", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    original = proto.SerializeToString()
    assert fold_if_equivalent(proto, (1, 1, 1)) == 0
    assert proto.SerializeToString() == original


def test_graphs_without_constant_branches_are_untouched():
    proto = _graph([helper.make_node("Relu", ["x"], ["r"])], [])
    proto.graph.node[-1].input[1] = "r"  # y = x + relu(x): the ConstantOfShape feeds nothing
    kept = [n.op_type for n in proto.graph.node]
    assert fold_if_equivalent(proto, (4, 3, 3)) == 0
    assert [n.op_type for n in proto.graph.node] == kept
