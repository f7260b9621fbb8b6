"""INT8 post-training quantization: calibrators, manifests, QDQ export and its TensorRT rules, ZeroQ."""
from __future__ import annotations

import collections
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from cifarpress.runtime.ort import make_session
from cifarpress.export.calibrate import AbsHistogram, activation_scale, calibration_manifest, calibrator_threshold, load_manifest, manifest_images, save_manifest, synthesize_images
from cifarpress.model_file import save_model
from cifarpress.cli import app
from cifarpress.data import dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import ExportCheckError, NormalizedClassifier, export_onnx
from cifarpress.models import build_model
from cifarpress.export.int8 import check_int8_rules, describe_int8, export_int8_checked, export_int8_qdq, quantize_onnx_int8, quantize_weight, unshare_initializers
from conftest import CLASSES
from typer.testing import CliRunner

SPEC = dataset_spec("cifar10")
REPO = Path(__file__).resolve().parents[1]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def true_mse(x: np.ndarray, threshold: float) -> float:
    step = threshold / 127
    return float(((x - np.clip(np.rint(x / step), -128, 127) * step) ** 2).mean())


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(size=200_000), [25.0, -40.0, 33.0]]).astype(np.float32)


# -- calibrators ---------------------------------------------------------------------------

def test_minmax_is_absmax_and_zeros_are_counted_apart():
    x = np.array([0.0, -3.5, 1.0, 0.0, 2.0], dtype=np.float32)
    hist = AbsHistogram.of(x)
    assert calibrator_threshold(hist, "minmax") == pytest.approx(3.5)
    assert hist.zeros == 2 and hist.counts.sum() == 3 and hist.total == 5
    assert activation_scale(0.0) == pytest.approx(1 / 127)  # all-zero tensor: any positive scale


def test_percentile_clips_heavy_tails(gaussian_with_outliers):
    hist = AbsHistogram.of(gaussian_with_outliers)
    threshold = calibrator_threshold(hist, "percentile")
    assert 3.0 < threshold < 5.0 < hist.absmax  # the 99.99th percentile of |N(0,1)| is 3.9


def test_entropy_and_mse_thresholds_are_sensible(gaussian_with_outliers):
    hist = AbsHistogram.of(gaussian_with_outliers)
    entropy, mse = calibrator_threshold(hist, "entropy"), calibrator_threshold(hist, "mse")
    assert 2.0 < entropy < 10.0 <= hist.absmax
    assert 2.0 < mse <= hist.absmax
    # the MSE calibrator's threshold is (near) the best of all candidates by the real quantization error
    errors = {name: true_mse(gaussian_with_outliers, calibrator_threshold(hist, name))
              for name in ("minmax", "percentile", "entropy", "mse")}
    assert errors["mse"] <= 1.02 * min(errors.values())
    assert errors["minmax"] > errors["mse"]


def test_calibrators_keep_the_range_of_an_outlier_free_uniform():
    x = np.random.default_rng(1).uniform(-2, 2, size=100_000).astype(np.float32)
    hist = AbsHistogram.of(x)
    for name in ("percentile", "entropy", "mse"):
        assert calibrator_threshold(hist, name) == pytest.approx(hist.absmax, rel=0.03), name
    with pytest.raises(CifarpressError, match="unknown calibrator"):
        calibrator_threshold(hist, "kl")


def test_quantize_weight_per_channel():
    w = np.stack([np.linspace(-1, 1, 9), np.linspace(-0.01, 0.02, 9), np.zeros(9)]).reshape(3, 1, 3, 3)
    codes, scale = quantize_weight(w.astype(np.float32))
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3,)
    assert scale == pytest.approx([1 / 127, 0.02 / 127, 1.0])  # zero channel: scale 1, codes 0
    assert np.abs(codes).max() == 127 and not codes[2].any()
    assert np.abs(codes * scale[:, None, None, None] - w).max() <= scale.max() / 2 + 1e-7
    _, shared = quantize_weight(w.astype(np.float32), per_channel=False)
    assert np.all(shared == shared[0])


# -- manifests -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_train(tiny_cifar_root):
    return load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)


def test_manifest_is_balanced_deterministic_and_round_trips(tmp_path, tiny_train):
    manifest = calibration_manifest("cifar10", tiny_train.labels, 50, seed=3)
    assert manifest["split"] == "train" and manifest["count"] == 50 and len(set(manifest["indices"])) == 50
    per_class = collections.Counter(tiny_train.labels[manifest["indices"]].tolist())
    assert set(per_class.values()) == {5}
    assert calibration_manifest("cifar10", tiny_train.labels, 50, seed=3) == manifest
    assert calibration_manifest("cifar10", tiny_train.labels, 50, seed=4)["indices"] != manifest["indices"]
    path = save_manifest(manifest, tmp_path / "m.json")
    assert load_manifest(path) == manifest
    assert manifest_images(manifest, tiny_train).shape == (50, 3, 32, 32)
    path.write_text(json.dumps(manifest | {"split": "test"}))
    with pytest.raises(CifarpressError, match="training split"):
        load_manifest(path)


@pytest.mark.parametrize("count", [512, 2048])
def test_shipped_manifests(count):
    manifest = load_manifest(REPO / "calibration" / f"cifar10-train-{count}.json")
    assert manifest["dataset"] == "cifar10" and manifest["count"] == count
    assert max(manifest["indices"]) < 50_000


# -- the QDQ export --------------------------------------------------------------------------

def random_resnet20(seed: int = 0) -> nn.Module:
    """A random resnet20 whose BNs fold into non-trivial per-channel scales and biases."""
    torch.manual_seed(seed)
    model = build_model("resnet20", 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, tiny_train):
    model = random_resnet20()
    manifest = calibration_manifest("cifar10", tiny_train.labels, 100, seed=0)
    path = export_int8_qdq(model, tmp_path_factory.mktemp("int8") / "resnet20-int8.onnx", SPEC,
                           tiny_train.classes, manifest_images(manifest, tiny_train), "entropy",
                           manifest=manifest, threads=1)
    return model, path


def test_int8_export_follows_tensorrt_rules(int8_export):
    _, path = int8_export
    assert check_int8_rules(path) == []
    proto = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Conv"] == 21 and ops["Gemm"] == 1
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] - 22  # 22 weight DQs, all else in pairs
    quantization = describe_int8(path)
    assert quantization["scheme"] == "int8" and quantization["calibrator"] == "entropy"
    assert quantization["calibration"]["manifest"]["count"] == 100


def _without_dq_before_first_conv(proto: onnx.ModelProto) -> None:
    producers = {o: n for n in proto.graph.node for o in n.output}
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    quantize = producers[producers[conv.input[0]].input[0]]
    conv.input[0] = quantize.input[0]  # the conv now reads the float tensor


def _set_zero_point(value: np.ndarray):
    def edit(proto: onnx.ModelProto) -> None:
        zp = next(t for t in proto.graph.initializer if "_zero_point_" in t.name)
        zp.CopyFrom(numpy_helper.from_array(value, zp.name))
    return edit


def _weight_dq_axis_removed(proto: onnx.ModelProto) -> None:
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized"))
    del dq.attribute[:]


@pytest.mark.parametrize("break_graph, message", [
    (_without_dq_before_first_conv, "data input is not dequantized"),
    (_set_zero_point(np.array(3, np.int8)), "non-zero zero point"),
    (_set_zero_point(np.array(128, np.uint8)), "not int8"),
    (_weight_dq_axis_removed, "per output channel on axis 0"),
])
def test_broken_graphs_are_reported(int8_export, break_graph, message):
    proto = onnx.load(str(int8_export[1]))
    break_graph(proto)
    problems = check_int8_rules(proto)
    assert problems and any(message in p for p in problems), problems


@pytest.mark.parametrize("optimize", [False, True])
def test_int8_logits_track_fp32(int8_export, tiny_cifar_root, optimize):
    model, path = int8_export
    test = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)
    pixels = test.images.float() / 255
    with torch.no_grad():
        reference = NormalizedClassifier(model, SPEC.mean, SPEC.std).eval()(pixels).numpy()
    logits = make_session(path, 1, optimize=optimize).run(["logits"], {"input": pixels.numpy()})[0]
    assert cosine(logits, reference) > 0.98
    # Random nets give every image similar logits; what tells images apart must survive too
    # (a single conv's weight scale off by 1.5x drops this to 0.990).
    assert cosine(logits - logits.mean(0), reference - reference.mean(0)) > 0.995


def test_onnxruntime_runs_every_conv_in_int8(int8_export, tmp_path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8_export[1]), opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 21 and ops["Conv"] == 0, ops
    assert ops["QLinearAdd"] >= 8, ops


def test_plain_tensorrt_placement_per_tensor_minmax(int8_export, tiny_train, tmp_path):
    """Without the pre-ReLU pairs and with per-tensor weights the graph still follows the rules and the model."""
    model, fused_path = int8_export
    path = export_int8_qdq(model, tmp_path / "plain.onnx", SPEC, tiny_train.classes, tiny_train.images[:64],
                           "minmax", per_channel=False, fuse_for_onnxruntime=False, threads=1)
    assert check_int8_rules(path) == []
    proto = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    fused_ops = collections.Counter(n.op_type for n in onnx.load(str(fused_path)).graph.node)
    assert fused_ops["QuantizeLinear"] - ops["QuantizeLinear"] == 18  # 1 stem + 9 block ReLUs, 8 residual Adds
    weight_scales = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("weight_scale")]
    assert len(weight_scales) == 22 and all(np.all(s == s[0]) for s in weight_scales)
    pixels = tiny_train.images[:50].float() / 255
    with torch.no_grad():
        reference = NormalizedClassifier(model, SPEC.mean, SPEC.std).eval()(pixels).numpy()
    logits = make_session(path, 1).run(["logits"], {"input": pixels.numpy()})[0]
    assert cosine(logits - logits.mean(0), reference - reference.mean(0)) > 0.99


def test_torchscript_fallback_with_shared_weights_exports(tiny_train, torchscript_only_export, tmp_path):
    """Models only the TorchScript exporter takes get int8 too, though it shares identical tensors via Identity."""
    import cifarpress.export.onnx

    model = random_resnet20(seed=1)
    twin, source = model.layer1[1], model.layer1[0]
    twin.conv1.load_state_dict(source.conv1.state_dict())
    twin.bn1.load_state_dict(source.bn1.state_dict())
    float_path = cifarpress.export.onnx.export_onnx(model, tmp_path / "float.onnx", SPEC, tiny_train.classes)
    assert unshare_initializers(onnx.load(str(float_path)).graph) >= 1  # the shape this test is about
    path = export_int8_qdq(model, tmp_path / "shared.onnx", SPEC, tiny_train.classes, tiny_train.images[:64],
                           "minmax", threads=1)
    assert check_int8_rules(path) == []
    assert not [n for n in onnx.load(str(path)).graph.node if n.op_type == "Identity"]
    pixels = tiny_train.images[:50].float() / 255
    with torch.no_grad():
        reference = NormalizedClassifier(model, SPEC.mean, SPEC.std).eval()(pixels).numpy()
    logits = make_session(path, 1).run(["logits"], {"input": pixels.numpy()})[0]
    assert cosine(logits - logits.mean(0), reference - reference.mean(0)) > 0.99


def test_export_rejects_normalized_calibration_images(tmp_path):
    normalized = torch.randn(8, 3, 32, 32) * 2
    with pytest.raises(CifarpressError, match="not normalized"):
        export_int8_qdq(random_resnet20(), tmp_path / "x.onnx", SPEC, [str(i) for i in range(10)], normalized)
    assert not (tmp_path / "x.onnx").exists()


# -- data-free calibration ------------------------------------------------------------------

def test_zeroq_images_approach_the_bn_statistics():
    result = synthesize_images(random_resnet20(1), SPEC, count=8, steps=30, seed=0)
    assert result.pixels.shape == (8, 3, 32, 32)
    assert 0.0 <= float(result.pixels.min()) and float(result.pixels.max()) <= 1.0
    assert result.losses[-1] < 0.5 * result.losses[0]
    with pytest.raises(CifarpressError, match="BatchNorm"):
        synthesize_images(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)), SPEC, steps=1)


# -- command line ------------------------------------------------------------------------------

def _cli(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cifarpress.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


def test_cli_exports_int8_qdq_and_rejects_precisions_it_lacks(tmp_path, tiny_cifar_root):
    from cifarpress.model_file import save_model

    save_model(tmp_path / "m.pt", random_resnet20(), "resnet20", 10, "cifar10")
    proc = _cli("export", str(tmp_path / "m.pt"), "--precision", "int8", "--calibrator", "percentile",
                "--calib-images", "50", "--check-images", "40", "--data-root", str(tiny_cifar_root))
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "m.int8.onnx"
    assert check_int8_rules(path) == [] and "top-1 agreement" in proc.stdout
    assert describe_int8(path)["calibrator"] == "percentile" and describe_int8(path)["calibration"]["images"] == 50
    bad = _cli("export", str(tmp_path / "m.pt"), "--precision", "fp16", "--data-root", str(tiny_cifar_root))
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and len(errors) == 1 and "--precision fp16" in errors[0], bad.stderr


def test_onnx_file_alone_quantizes_to_the_same_graph(int8_export, tiny_train, tmp_path):
    """Calibrating a float ONNX file gives the graph that export_int8_qdq gives from its PyTorch model."""
    from cifarpress.export.onnx import export_onnx

    model, _ = int8_export
    images = tiny_train.images[:64]
    from_torch = export_int8_qdq(model, tmp_path / "torch.onnx", SPEC, tiny_train.classes, images, "mse", threads=1)
    float_path = export_onnx(model, tmp_path / "float.onnx", SPEC, tiny_train.classes)
    from_file = quantize_onnx_int8(float_path, tmp_path / "file.onnx", images, "mse", threads=1)
    a, b = (onnx.load(str(p)).graph for p in (from_torch, from_file))
    assert [n.op_type for n in a.node] == [n.op_type for n in b.node]
    for x, y in zip(a.initializer, b.initializer):
        assert x.name == y.name and np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y)), x.name
    assert describe_int8(from_file)["calibrator"] == "mse"
    with pytest.raises(CifarpressError, match="already quantized"):
        quantize_onnx_int8(from_file, tmp_path / "again.onnx", images)
    bare = onnx.load(str(float_path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(CifarpressError, match="not a cifarpress export .* pixels in \\[0, 1\\]"):
        quantize_onnx_int8(tmp_path / "bare.onnx", tmp_path / "bare.int8.onnx", images)


def test_cli_quantizes_an_onnx_file(tmp_path, tiny_cifar_root):
    from cifarpress.export.onnx import export_onnx

    test = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)
    export_onnx(random_resnet20(), tmp_path / "m.onnx", SPEC, test.classes)
    proc = _cli("export", str(tmp_path / "m.onnx"), "--precision", "int8", "--calib-images", "50",
                "--check-images", "40", "--data-root", str(tiny_cifar_root))
    assert proc.returncode == 0, proc.stderr
    assert check_int8_rules(tmp_path / "m.int8.onnx") == [] and "top-1 agreement with the float ONNX" in proc.stdout
    again = _cli("export", str(tmp_path / "m.int8.onnx"), "--precision", "int8", "--data-root", str(tiny_cifar_root))
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode != 0 and len(errors) == 1 and "already quantized" in errors[0], again.stderr


# -- per-layer control: exclude, max_drop, the sensitivity sweep --------------------------------

@pytest.fixture(scope="module")
def trained_small(tiny_train, tiny_cifar_root):
    """A small conv net trained on the tiny data (well above chance), for accuracy-gated int8 tests."""
    from cifarpress.train.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    test = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)
    cfg = TrainConfig(epochs=8, batch_size=20, lr=0.1, eval_batch_size=100, channels_last=False)
    result = Trainer(model, cfg, device=torch.device("cpu"), quiet=True).fit(tiny_train, test)
    assert result.top1 > 40
    return result.model.eval(), test


def int8_hostile(model: nn.Module) -> nn.Module:
    """The same function, but conv '3' cannot be int8: its input channel 0 is always 0 (BN bias -100 before a
    ReLU), and a huge weight there sets every output channel's int8 scale, rounding the real weights to 0."""
    hostile = copy.deepcopy(model)
    with torch.no_grad():
        hostile[1].bias[0] = -100.0
        hostile[3].weight[:, 0] = 1e4
    return hostile


def test_int8_layer_names_follow_the_pytorch_modules(int8_export):
    from cifarpress.export.int8 import int8_layers

    model, _ = int8_export
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_onnx(model, Path(tmp) / "f.onnx", SPEC, CLASSES)
        names = list(int8_layers(onnx.load(str(float_path)).graph).values())
    assert names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert "layer2.0.shortcut.0" in names and "layer3.2.add" in names and names[-1] == "fc"
    assert len(names) == 22 + 9  # 21 convs, the classifier, 9 residual adds


def test_exclude_keeps_layers_in_float(trained_small, tiny_train, tmp_path):
    model, test = trained_small
    exported = export_int8_checked(model, tmp_path / "m.int8.onnx", tiny_train, test, "minmax", 100, 100,
                                   threads=1, exclude=["3", "Gemm"])
    proto = onnx.load(str(exported.path))
    weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}
    assert "model.0.weight_dequantized" in weights  # conv 0 is int8
    assert "model.3.weight" in weights and "model.8.weight" in weights  # conv 3 and the classifier stay float
    assert describe_int8(exported.path)["float_layers"] == ["3", "8"]
    assert check_int8_rules(exported.path) == []  # float layers between int8 ones are fine for TensorRT
    with pytest.raises(CifarpressError, match="'layer9' matches no quantized layer.*layers here: 0, 3, 8"):
        export_int8_checked(model, tmp_path / "x.onnx", tiny_train, test, "minmax", 100, 100, exclude=["layer9"])


def test_max_drop_fails_naming_the_worst_layer_and_publishes_nothing(trained_small, tiny_train, tmp_path):
    model, test = trained_small
    hostile = int8_hostile(model)
    target = tmp_path / "h.int8.onnx"
    with pytest.raises(ExportCheckError, match=r"more than max_drop 1; the layers that lose most: 3 \(-") as info:
        export_int8_checked(hostile, target, tiny_train, test, "minmax", 100, 100, threads=1, max_drop=1.0)
    assert "exclude: [3" in str(info.value) and "\n" not in str(info.value)
    assert not target.exists()
    kept = export_int8_checked(hostile, target, tiny_train, test, "minmax", 100, 100, threads=1, max_drop=1.0,
                               exclude=["3"])  # the fix the message names
    assert kept.top1_drop_pp <= 1.0 and target.exists()


def test_sensitivity_sweep_ranks_the_hostile_layer_first(trained_small, tiny_train, tmp_path):
    from cifarpress.export.int8 import int8_sensitivity

    model, test = trained_small
    float_path = export_onnx(int8_hostile(model), tmp_path / "h.onnx", SPEC, CLASSES)
    ranking = int8_sensitivity(float_path, tiny_train.images[:100], test.images.float() / 255, test.labels.numpy(),
                               "minmax", threads=1)
    assert [r["layer"] for r in ranking][0] == "3" and ranking[0]["top1_drop_pp"] > 10
    assert {r["layer"] for r in ranking} == {"0", "3", "8"}


def test_recipe_and_cli_take_max_drop_and_exclude(tmp_path, tiny_cifar_root):
    from cifarpress.pipeline.recipe import recipe_from_dict

    raw = {"name": "r", "model": {"arch": "resnet20", "checkpoint": "builtin:resnet20-cifar10"},
           "stages": [{"export": {"precision": "int8", "max_drop": 0.5, "exclude": ["fc", "layer1.0.conv1"]}}]}
    stage = recipe_from_dict(raw, tmp_path, "r.yaml").stages[0].config
    assert stage.max_drop == 0.5 and stage.exclude == ["fc", "layer1.0.conv1"]
    raw["stages"] = [{"export": {"precision": "fp32", "exclude": ["fc"]}}]
    with pytest.raises(CifarpressError, match="precision: int8 only"):
        recipe_from_dict(raw, tmp_path, "r.yaml")
    model = tmp_path / "m.pt"
    save_model(model, random_resnet20(), "resnet20", 10, "cifar10")
    result = CliRunner().invoke(app, ["export", str(model), "--precision", "int8", "--exclude", "fc", "--exclude",
                                      "layer3", "--calib-images", "50", "--check-images", "50", "--data-root",
                                      str(tiny_cifar_root)])
    assert result.exit_code == 0, result.output
    float_layers = describe_int8(tmp_path / "m.int8.onnx")["float_layers"]
    assert float_layers[-1] == "fc" and all(n == "fc" or n.startswith("layer3.") for n in float_layers)
    assert len(float_layers) == 1 + 7 + 3  # the classifier, stage 3's 6 convs and shortcut, its 3 adds
