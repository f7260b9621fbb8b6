"""Load-time lowering of the TensorRT int8 QDQ graph for onnxruntime's CPU kernels (cifarpress.runtime.ort_lowering)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from cifarpress.runtime.ort import make_session
from cifarpress.data import dataset_spec, load_split
from cifarpress.export.onnx import export_onnx
from cifarpress.runtime.ort_lowering import fold_clip_quantize, fold_relu_chains, fold_weight_dequantize, folded_relu_count, lowered_bytes, lowered_path, lowering_counts, merge_shared_quantize, reduce_weight_range, REDUCED_WEIGHT_MAX
from cifarpress.export.int8 import check_int8_rules, export_int8_qdq
from test_int8 import random_resnet20

SPEC = dataset_spec("cifar10")
RESNET20_FOLDABLE_RELUS = 18  # stem + 2 per block but the last, which feeds the pooling rather than a Q


@pytest.fixture(scope="module")
def minmax_export(tmp_path_factory, tiny_cifar_root):
    """An int8 export calibrated (minmax) on exactly the images it is then run on: nothing saturates."""
    train = load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)
    pixels = train.images[:64]
    path = export_int8_qdq(random_resnet20(), tmp_path_factory.mktemp("lower") / "r20.onnx", SPEC, train.classes,
                           pixels, "minmax", threads=1)
    return path, pixels.float().numpy() / 255


def as_written(model: str | bytes, optimized_copy: str | None = None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_copy:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = optimized_copy
    else:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def widened(proto: onnx.ModelProto, factor: float = 4.0) -> onnx.ModelProto:
    """Every activation scale (the scalar ones) times `factor`: quantization error stacked up through the
    layers can push a tensor past its calibrated range, and only there do int8 and uint8 differ."""
    for tensor in proto.graph.initializer:
        if tensor.name.endswith("_scale") and not tensor.dims:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * factor, tensor.name))
    return proto


def test_folding_is_exact_below_saturation(minmax_export, tmp_path):
    path, pixels = minmax_export
    onnx.save(widened(onnx.load(str(path))), tmp_path / "wide.onnx")
    path = tmp_path / "wide.onnx"
    proto = onnx.load(str(path))
    relus_before = sum(n.op_type == "Relu" for n in proto.graph.node)
    assert fold_relu_chains(proto) == RESNET20_FOLDABLE_RELUS == folded_relu_count(path)
    assert sum(n.op_type == "Relu" for n in proto.graph.node) == relus_before - RESNET20_FOLDABLE_RELUS
    onnx.checker.check_model(proto)
    # Both graphs run node by node as written (no onnxruntime fusions): the same integer codes, the same logits.
    reference = as_written(str(path)).run(["logits"], {"input": pixels})[0]
    folded = as_written(proto.SerializeToString()).run(["logits"], {"input": pixels})[0]
    np.testing.assert_allclose(folded, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_onnxruntime_fuses_the_folded_relus(minmax_export, tmp_path):
    path, _ = minmax_export
    optimized = {}
    for name, model in (("file", str(path)), ("lowered", lowered_bytes(path))):
        as_written(model, str(tmp_path / f"{name}.onnx"))
        optimized[name] = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
    assert optimized["file"]["Relu"] == 19  # every ReLU runs in float between a DQ and a Q
    assert optimized["lowered"]["Relu"] == 1, optimized["lowered"]
    assert optimized["lowered"]["QLinearConv"] == 21 and optimized["lowered"]["Conv"] == 0


def test_sessions_run_the_lowered_graph_and_the_file_stays_the_tensorrt_one(minmax_export):
    path, pixels = minmax_export
    before = path.read_bytes()

    def fused(model):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(["logits"], {"input": pixels})[0]

    logits = make_session(path, 1).run(["logits"], {"input": pixels})[0]
    np.testing.assert_array_equal(logits, fused(lowered_bytes(path)))
    assert not np.array_equal(logits, fused(str(path)))
    assert path.read_bytes() == before and check_int8_rules(path) == []
    with lowered_path(path) as lowered:
        assert lowered != path and check_int8_rules(lowered)  # uint8 activations: for onnxruntime only
        np.testing.assert_array_equal(fused(str(lowered)), logits)
    assert not lowered.exists()


def test_chain_with_a_different_scale_after_the_relu_is_left_alone(minmax_export):
    proto = onnx.load(str(minmax_export[0]))
    producers = {o: n for n in proto.graph.node for o in n.output}
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    after = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == relu.output[0])
    scale = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == after.input[1]))
    doubled = numpy_helper.from_array(scale * 2, after.input[1] + "_doubled")
    proto.graph.initializer.append(doubled)
    after.input[1] = doubled.name
    assert producers[relu.input[0]].op_type == "DequantizeLinear"
    assert fold_relu_chains(proto) == RESNET20_FOLDABLE_RELUS - 1


def test_float_graphs_are_not_touched(tmp_path):
    path = export_onnx(random_resnet20(), tmp_path / "fp32.onnx", SPEC, [str(i) for i in range(10)])
    assert lowered_bytes(path) is None and folded_relu_count(path) == 0
    with lowered_path(path) as same:
        assert same == path


def _ternary_export(tmp_path, act_bits=None):
    import torch

    from cifarpress.techniques.quantize.ternary import TernaryConfig, calibrate_activations, quantize_model
    from cifarpress.export.qdq import export_qdq

    model = random_resnet20()
    quantize_model(model, TernaryConfig(act_bits=act_bits))
    if act_bits:
        calibrate_activations(model, torch.randn(16, 3, 32, 32))
    return export_qdq(model.eval(), tmp_path / f"ternary-a{act_bits}.onnx", SPEC, [str(i) for i in range(10)])


def test_weight_only_quantized_layers_run_with_float_weights(tmp_path, tiny_cifar_root):
    """A ternary graph without quantized activations: every weight DequantizeLinear becomes its exact float value."""
    path = _ternary_export(tmp_path)
    proto = onnx.load(str(path))
    weight_dqs = sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    assert fold_weight_dequantize(proto) == weight_dqs == 22 == lowering_counts(path)["weights"]
    assert not [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    constants = {t.name for t in proto.graph.initializer}
    assert all(n.input[1] in constants for n in proto.graph.node if n.op_type in ("Conv", "Gemm"))
    pixels = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False).images.float().numpy() / 255
    written = as_written(str(path)).run(["logits"], {"input": pixels})[0]
    lowered = make_session(path, 1).run(["logits"], {"input": pixels})[0]
    assert np.abs(written - lowered).max() < 1e-4 * max(1.0, np.abs(written).max())


def test_weights_beside_quantized_activations_stay_quantized(minmax_export, tmp_path):
    """Where the activation is quantized too, onnxruntime fuses the pair into an integer kernel: keep it."""
    for path in (minmax_export[0], _ternary_export(tmp_path, act_bits=8)):
        proto = onnx.load(str(path))
        assert fold_weight_dequantize(proto) == 0, path


def test_cli_lower_writes_the_graph_onnxruntime_runs(minmax_export, tmp_path):
    from typer.testing import CliRunner

    from cifarpress.cli import app

    path, pixels = minmax_export
    result = CliRunner().invoke(app, ["lower", str(path), "-o", str(tmp_path / "r20.ort.onnx")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{RESNET20_FOLDABLE_RELUS} ReLU chains folded" in result.output
    plain = make_session(tmp_path / "r20.ort.onnx", 1, lower=False)  # onnxruntime's own optimizations only
    lowered = plain.run(["logits"], {"input": pixels})[0]
    in_session = make_session(path, 1).run(["logits"], {"input": pixels})[0]
    assert np.array_equal(lowered, in_session)  # what plain onnxruntime gets is what cifarpress measured
    assert lowered_bytes(tmp_path / "r20.ort.onnx") is None  # nothing left to lower
    float_path = export_onnx(random_resnet20(), tmp_path / "fp32.onnx", SPEC, [str(i) for i in range(10)])
    result = CliRunner().invoke(app, ["lower", str(float_path)], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and "nothing to lower" in result.output


def test_resnet_graphs_have_no_relu6_or_shared_quantization(minmax_export):
    assert lowering_counts(minmax_export[0], reduce_range=False) == {
        "relu_chains": RESNET20_FOLDABLE_RELUS, "clip_chains": 0, "merged_quantize": 0, "weights": 0, "weights_7bit": 0}


def _clip_graph(scale: float) -> onnx.ModelProto:
    """x -> Clip(0, 6) -> Q(scale, int8, 0) -> DQ -> y, as the int8 export writes a ReLU6."""
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.array(v, dtype=t), n) for v, t, n in
             ((0.0, np.float32, "lo"), (6.0, np.float32, "hi"), (scale, np.float32, "s"), (0, np.int8, "z"))]
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "relu6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("scale", [0.02, 0.05])  # 255 * scale below 6 (same grid) and above it (finer grid)
def test_relu6_clip_becomes_a_uint8_quantization(scale):
    x = np.linspace(-3, 14, 4001, dtype=np.float32)
    proto = _clip_graph(scale)
    reference = as_written(proto.SerializeToString()).run(["y"], {"x": x})[0]
    assert fold_clip_quantize(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["QuantizeLinear", "DequantizeLinear"]
    onnx.checker.check_model(proto)
    lowered = as_written(proto.SerializeToString()).run(["y"], {"x": x})[0]
    relu6 = np.clip(x, 0, 6)
    step = min(scale, 6 / 255)
    top = 255 * step  # uint8 saturation; the Clip's 6 where the int8 scale was coarser than 6/255
    assert lowered.min() == 0 and np.isclose(lowered.max(), top) and top <= 6 + 1e-6
    inside = relu6 <= top
    assert np.abs(lowered - relu6)[inside].max() <= step / 2 + 1e-6  # within half a step of the float ReLU6
    assert np.abs(lowered - relu6).max() <= np.abs(reference - relu6).max()  # worst case no worse than int8's
    if scale == 0.02:  # same grid: the int8 codes themselves up to int8's saturation at 127, then closer
        below = x <= 127 * scale
        np.testing.assert_array_equal(lowered[below], reference[below])
        assert np.all(np.abs(lowered - relu6) <= np.abs(reference - relu6) + 1e-6)


def _random_mobilenetv2():
    import torch
    from torch import nn

    from cifarpress.models import build_model

    torch.manual_seed(0)
    model = build_model("mobilenetv2", 10)
    with torch.no_grad():  # activations that reach ReLU6's 6 in some layers and not in others
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.2, 1.0)
                m.bias.uniform_(-0.5, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def mobilenet_export(tmp_path_factory, tiny_cifar_root):
    train = load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)
    model = _random_mobilenetv2()
    folder = tmp_path_factory.mktemp("mobilenet")
    path = export_int8_qdq(model, folder / "mbv2.int8.onnx", SPEC, train.classes, train.images[:32], "minmax",
                           threads=1)
    float_path = export_onnx(model, folder / "mbv2.onnx", SPEC, train.classes)
    return path, float_path, train.images[:32].float().numpy() / 255


def test_merging_shared_quantizations_changes_no_value(mobilenet_export):
    path, _, pixels = mobilenet_export
    proto = onnx.load(str(path))
    quantize_before = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    merged = merge_shared_quantize(proto)
    assert merged == 10  # MobileNetV2's residual sums that feed both the next block and the next sum
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == quantize_before - merged
    onnx.checker.check_model(proto)
    reference = as_written(str(path)).run(["logits"], {"input": pixels})[0]
    np.testing.assert_array_equal(as_written(proto.SerializeToString()).run(["logits"], {"input": pixels})[0],
                                  reference)


def test_mobilenetv2_int8_runs_as_integer_kernels(mobilenet_export, tmp_path):
    path, float_path, pixels = mobilenet_export
    counts = lowering_counts(path)
    assert counts["clip_chains"] == 34 and counts["merged_quantize"] == 10  # every ReLU6 but the one before pooling
    optimized = {}
    for name, model in (("file", str(path)), ("lowered", lowered_bytes(path))):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 1, 3
        opts.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        optimized[name] = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
    convs = 52  # all but the classifier: the stem, 17 blocks' two or three, the last 1x1 conv
    assert optimized["file"]["QLinearConv"] < 20, optimized["file"]
    # The last conv feeds the pooling unquantized, so it stays float (fused with its ReLU6).
    assert optimized["lowered"]["QLinearConv"] == convs - 1 and optimized["lowered"]["FusedConv"] == 1
    assert optimized["lowered"]["QLinearAdd"] == 10 and "Add" not in optimized["lowered"], optimized["lowered"]
    # Closer to the float model than the graph as written, if anything (a finer grid where ReLU6 saturates).
    reference = as_written(str(float_path)).run(["logits"], {"input": pixels})[0]
    written = as_written(str(path)).run(["logits"], {"input": pixels})[0]
    # The lowering's own math (full 8-bit weights; a host without VNNI runs them in 7-bit range, which the
    # host-kernel test below covers).
    lowered = as_written(lowered_bytes(path, reduce_range=False)).run(["logits"], {"input": pixels})[0]
    assert np.abs(lowered - reference).mean() <= 1.05 * np.abs(written - reference).mean()
    assert (lowered.argmax(1) == written.argmax(1)).mean() >= 0.9


def test_reduced_range_weights_fit_int16_pair_sums(minmax_export):
    """7-bit weights for CPUs without VNNI: every code within [-64, 64], each channel's values within half a
    (new) step of the 8-bit ones, and only the integer kernels' weights touched."""
    path = minmax_export[0]
    proto = onnx.load(str(path))
    before = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    fold_weight_dequantize(proto)
    reduced = reduce_weight_range(proto)
    assert reduced == 22  # 19 convs, 2 projection shortcuts and the classifier
    after = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_7bit"):
            continue
        codes, scale = after[node.input[0]], after[node.input[1]]
        old_codes, old_scale = before[node.input[0][:-5]], before[node.input[1][:-5]]
        assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= REDUCED_WEIGHT_MAX
        shape = (-1,) + (1,) * (codes.ndim - 1)
        old_values = old_codes * old_scale.reshape(shape)
        new_values = codes * scale.reshape(shape)
        assert np.all(np.abs(new_values - old_values) <= scale.reshape(shape) / 2 + 1e-7)
        assert np.all(scale >= old_scale)
    assert reduce_weight_range(proto) == 0  # idempotent: nothing left beyond 64


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
def test_host_kernels_compute_what_the_lowered_graph_says(minmax_export, reduce_range):
    """onnxruntime's integer kernels on this CPU give the lowered graph's own QDQ math. With 8-bit weights that
    needs VNNI (AVX2 kernels saturate int16 pair sums); 7-bit weights, what cifarpress lowers to on such hosts,
    must hold on every CPU."""
    from cifarpress.runtime.host import int8_kernels_exact

    if not reduce_range and not int8_kernels_exact():
        pytest.skip("8-bit weights saturate this CPU's int8 kernels (no VNNI); the 7-bit case covers this host")
    path, pixels = minmax_export[0], minmax_export[1]
    lowered = lowered_bytes(path, reduce_range=reduce_range)
    exact = as_written(lowered).run(["logits"], {"input": pixels})[0]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    host = ort.InferenceSession(lowered, opts, providers=["CPUExecutionProvider"]).run(["logits"], {"input": pixels})[0]
    # Only the int32 bias rounding of the fused kernels differs from the float emulation of the QDQ math.
    centred = lambda a: a - a.mean(0)  # noqa: E731
    assert np.abs(host - exact).max() <= 0.05 * np.abs(exact).max()
    cos = (centred(host) * centred(exact)).sum() / (np.linalg.norm(centred(host)) * np.linalg.norm(centred(exact)))
    assert cos > 0.995
