"""cifarpress.quantize: BitNet b1.58 ternary QAT numerics, policy, plug-in, QDQ ONNX export, packed artifact."""
from __future__ import annotations

import copy
import math
import struct

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from cifarpress.data import dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.export.onnx import export_onnx
from cifarpress.runtime.onnx_file import read_onnx_metadata
from cifarpress.models import build_model
from cifarpress.techniques.quantize.ternary import Int8Conv2d, Int8Linear, TernaryConfig, TernaryConv2d, TernaryLinear, calibrate_activations, layer_report, quantize_model, quantized_layers
from cifarpress.techniques.quantize.qat import TernaryQAT
from cifarpress.export.qdq import check_qdq, export_qdq
from cifarpress.export.packed import load_packed, read_packed_header, save_packed
from cifarpress.export.packed import MAGIC, pack_ternary, unpack_ternary
from cifarpress.train.trainer import Plugin, TrainConfig, Trainer

SPEC = dataset_spec("cifar10")
CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def tiny(tiny_cifar_root):
    return (load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False),
            load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False))


def normalized(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BN (some gamma < 0), so that BN folding at export really changes the conv weights."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) * 2.0 - 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
    return model


# -- numerics against a hand-written reference ---------------------------------------

def reference_ternary(weight: torch.Tensor, method: str, per_channel: bool) -> tuple[list[float], np.ndarray]:
    """Scales and RoundClip(W/s, -1, 1)*s in plain Python: lower median, round half to even (Python's round)."""
    w = weight.detach().double().numpy()
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    scales, out = [], np.empty_like(rows)
    for i, row in enumerate(rows):
        mags = sorted(abs(float(v)) for v in row)
        s = sum(mags) / len(mags) if method == "absmean" else mags[(len(mags) - 1) // 2]
        s = max(s, 1e-5)
        scales.append(s)
        for j, v in enumerate(row):
            out[i, j] = min(1, max(-1, round(float(v) / s))) * s
    return scales, out.reshape(w.shape)


@pytest.mark.parametrize("method", ["absmean", "absmedian"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ternary_weights_match_the_reference(method, granularity):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=False)
    layer = TernaryConv2d.from_float(conv, TernaryConfig(scale=method, granularity=granularity))
    assert torch.equal(layer.weight, conv.weight) and layer.weight is not conv.weight  # copied, not shared
    scales, expected = reference_ternary(conv.weight, method, granularity == "channel")
    got_scale = layer.weight_scale().flatten().double().numpy()
    np.testing.assert_allclose(got_scale, scales, rtol=1e-6)
    wq = layer.quantized_weight()
    np.testing.assert_allclose(wq.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    # exactly {-s, 0, s}: codes are integers in [-1, 1] and Wq = codes * s bit for bit
    codes, s = layer.weight_codes(), layer.weight_scale()
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(wq, codes * s)
    rows = wq.flatten(1) if granularity == "channel" else wq.reshape(1, -1)
    for row, scale in zip(rows, s.flatten().expand(len(rows))):
        assert set(row.abs().unique().tolist()) <= {0.0, scale.item()}
    layer.freeze()  # deployed form: same codes and scale, latent weight = Wq
    assert torch.equal(layer.weight, wq) and torch.equal(layer.quantized_weight(), wq)
    if method == "absmedian":  # really a different statistic
        assert not torch.allclose(s, TernaryConv2d.from_float(conv, TernaryConfig(granularity=granularity)).weight_scale())


def test_all_zero_weights_quantize_to_zero():
    layer = TernaryLinear.from_float(nn.Linear(4, 3), TernaryConfig(scale="absmedian"))
    layer.weight.data.zero_()
    assert torch.equal(layer.quantized_weight(), torch.zeros(3, 4))
    assert torch.isfinite(layer(torch.randn(2, 4))).all()


def test_int8_weights_are_per_channel_absmax():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(nn.Linear(20, 5))
    codes, scale = layer.weight_codes(), layer.weight_scale()
    assert scale.shape == (5, 1)
    torch.testing.assert_close(scale.flatten(), layer.weight.abs().amax(1) / 127)
    assert codes.abs().amax(1).tolist() == [127.0] * 5
    assert (layer.quantized_weight() - layer.weight).abs().le(scale / 2 + 1e-7).all()
    assert isinstance(Int8Conv2d.from_float(nn.Conv2d(3, 4, 3)), nn.Conv2d)


def test_straight_through_gradient_reaches_the_latent_weights():
    torch.manual_seed(0)
    conv = TernaryConv2d.from_float(nn.Conv2d(4, 5, 3, padding=1), TernaryConfig(act_bits=8))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    upstream = torch.randn(2, 5, 6, 6)
    (conv(x) * upstream).sum().backward()
    # the same conv on the quantized weights and quantized input, both as leaves
    wq = conv.quantized_weight().requires_grad_()
    with torch.no_grad():
        scale = x.abs().amax() / 127
        xq = ((x / scale).round().clamp(-128, 127) * scale)
    xq.requires_grad_()
    out = F.conv2d(xq, wq, conv.bias, padding=1)
    grad_w, grad_x = torch.autograd.grad((out * upstream).sum(), (wq, xq))
    torch.testing.assert_close(conv.weight.grad, grad_w)
    torch.testing.assert_close(x.grad, grad_x)
    # and the forward value is exactly the quantized computation
    with torch.no_grad():
        conv.train()
        torch.testing.assert_close(conv(x), out.detach(), rtol=0, atol=0)


def test_activation_quantization_dynamic_in_training_static_in_eval():
    torch.manual_seed(0)
    layer = TernaryLinear.from_float(nn.Linear(8, 3), TernaryConfig(act_bits=8, act_granularity="sample"))
    layer.layer_name = "head"
    x = torch.randn(4, 8) * torch.tensor([[1.0], [10.0], [0.1], [3.0]])
    absmax = x.abs().max().item()
    with pytest.raises(CifarpressError, match="'head'.*calibrate_activations"):
        layer.eval()(x)
    layer.train()
    quantized = layer.quantize_input(x)
    for row, original in zip(quantized, x):  # per sample: each image on its own absmax/127 grid
        steps = row / (original.abs().max() / 127)
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert steps.abs().max().round() == 127
    assert layer.act_absmax.item() == pytest.approx(absmax)  # the first batch sets the range
    layer.quantize_input(x * 2)
    assert layer.act_absmax.item() == pytest.approx(1.1 * absmax)  # later ones move it by momentum 0.1
    layer.eval()  # evaluation: one static grid for the whole batch
    steps = layer.quantize_input(x) / (1.1 * absmax / 127)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    net = nn.Sequential(layer).eval()
    calibrate_activations(net, x * 3)
    assert layer.act_absmax.item() == pytest.approx(3 * absmax) and not layer.training


def test_warmup_blend_endpoints():
    torch.manual_seed(0)
    float_conv = nn.Conv2d(3, 4, 3, bias=False)
    layer = TernaryConv2d.from_float(float_conv).train()
    x = torch.randn(2, 3, 8, 8)
    wq = layer.quantized_weight()
    layer.blend = 0.0
    assert torch.equal(layer.effective_weight(), float_conv.weight)
    torch.testing.assert_close(layer(x), float_conv(x), rtol=0, atol=0)
    layer.blend = 0.5
    torch.testing.assert_close(layer.effective_weight(), (float_conv.weight + wq) / 2)
    layer.blend = 1.0
    assert torch.equal(layer.effective_weight(), wq)
    layer.blend = 0.0
    layer.eval()  # evaluation always sees the deployable weights
    assert torch.equal(layer.effective_weight(), wq)


# -- the policy ----------------------------------------------------------------------

def test_default_policy_keeps_first_conv_and_classifier_at_int8():
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    precisions = quantize_model(model)
    assert precisions["conv1"] == "int8" and precisions["fc"] == "int8"
    assert list(precisions) == list(before) and sum(p == "ternary" for p in precisions.values()) == 20
    assert isinstance(model.conv1, Int8Conv2d) and isinstance(model.fc, Int8Linear)
    assert isinstance(model.layer2[0].shortcut[0], TernaryConv2d)
    for name, layer in quantized_layers(model).items():
        assert torch.equal(layer.weight, before[name])  # latent weights are the float ones
    report = {r["name"]: r for r in layer_report(model)}
    assert report["layer1.0.conv1"]["bits"] == 1.58 and report["conv1"]["bits"] == 8
    row = report["layer3.2.conv2"]
    codes = model.layer3[2].conv2.weight_codes()
    assert row["params"] == codes.numel() and row["weight_bytes"] == codes.numel() // 4
    assert row["zero_fraction"] == pytest.approx((codes == 0).float().mean().item())
    assert 0.2 < row["zero_fraction"] < 0.5  # Gaussian weights: about 31% fall below s/2
    assert row["scale"] == pytest.approx(model.layer3[2].conv2.weight.abs().mean().item(), rel=1e-6)
    ternary = sum(r["params"] for r in report.values() if r["precision"] == "ternary")
    assert ternary / sum(r["params"] for r in report.values()) > 0.99
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_keep_list_and_settings_errors():
    with pytest.raises(CifarpressError, match=r"'layer9\.conv'.*layer1\.0\.conv1"):
        quantize_model(build_model("resnet20", 10), TernaryConfig(keep=["layer9.conv"]))
    with pytest.raises(CifarpressError, match=r"act_bits=4.*None.*8"):
        TernaryConfig(act_bits=4)
    with pytest.raises(CifarpressError, match=r"scale='absmax'.*'absmean', 'absmedian'"):
        TernaryConfig(scale="absmax")
    with pytest.raises(CifarpressError, match="granularity='row'"):
        TernaryConfig(granularity="row")
    with pytest.raises(CifarpressError, match="warmup_steps"):
        TernaryConfig(warmup_steps=-1)
    model = small_net()
    assert quantize_model(model, TernaryConfig(keep=[])) == {"0": "ternary", "3": "ternary", "8": "ternary"}
    with pytest.raises(CifarpressError, match="already holds quantized layers"):
        quantize_model(model)
    assert quantize_model(small_net(), TernaryConfig(keep=["3"]))["3"] == "int8"


# -- the plug-in through the real Trainer ------------------------------------------------

@pytest.fixture(scope="module")
def trained_int8_inputs(tiny):
    """resnet20 after 3 QAT steps with int8 inputs (per-sample scales) and a 2-step warm-up."""
    train, test = tiny
    torch.manual_seed(0)
    plugin = TernaryQAT(TernaryConfig(act_bits=8, act_granularity="sample", warmup_steps=2))
    blends = []

    class Spy(Plugin):  # records the warm-up as training sees it
        name = "spy"

        def after_step(self, trainer):
            blends.append(trainer.model.layer1[0].conv1.blend)

    model = build_model("resnet20", 10)
    initial = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(epochs=1, batch_size=20, lr=0.05, max_steps_per_epoch=3, eval_batch_size=100, seed=0)
    result = Trainer(model, cfg, plugins=[plugin, Spy()], device=torch.device("cpu"), quiet=True).fit(train, test)
    return result, plugin, blends, initial


def test_plugin_trains_through_the_trainer(trained_int8_inputs):
    result, plugin, blends, initial = trained_int8_inputs
    assert math.isfinite(result.history[0]["train_loss"]) and math.isfinite(result.top1)
    assert blends == [0.5, 1.0, 1.0] and result.history[0]["ternary_blend"] == 1.0
    assert plugin.precisions["conv1"] == "int8" and plugin.precisions["layer1.0.conv1"] == "ternary"
    layers = quantized_layers(result.model)
    assert len(layers) == 22 and all(m.act_absmax.item() > 0 for m in layers.values())
    # the optimizer was built after the swap: the swapped layers' latent weights moved
    assert not torch.equal(layers["layer1.0.conv1"].weight.detach(), initial["layer1.0.conv1.weight"])
    assert not torch.equal(layers["fc"].weight.detach(), initial["fc.weight"])
    assert plugin.state_dict() == {"steps": 3}
    resumed = TernaryQAT(TernaryConfig(warmup_steps=6))
    resumed.load_state_dict(plugin.state_dict())
    assert resumed.steps == 3 and resumed.blend() == 0.5


def test_plugin_before_ema_is_required():
    from cifarpress.train.ema import WeightEMA

    with pytest.raises(CifarpressError, match="'ternary-qat' .QUANTIZE. is listed after 'ema' .AVERAGE."):
        Trainer(small_net(), TrainConfig(), plugins=[WeightEMA(), TernaryQAT()], device=torch.device("cpu"))


# -- QDQ ONNX ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet20_exports(tmp_path_factory):
    """Random resnet20 with non-trivial BN: its fp32 ONNX, and ternary (fc ternary too, per tensor) as QDQ + packed."""
    folder = tmp_path_factory.mktemp("ternary")
    torch.manual_seed(0)
    float_model = randomize_batchnorm(build_model("resnet20", 10)).eval()
    fp32_path = export_onnx(float_model, folder / "fp32.onnx", SPEC, CLASSES)
    model = copy.deepcopy(float_model)
    quantize_model(model, TernaryConfig(keep=["conv1"]))
    qdq_path = export_qdq(model, folder / "qdq.onnx", SPEC, CLASSES, {"arch": "resnet20"})
    packed_path = save_packed(model, folder / "model.cpt", "resnet20", 10, "cifar10")
    return model, fp32_path, qdq_path, packed_path


def test_qdq_weights_are_ternary_int8_per_channel(resnet20_exports, tiny):
    model, _, path, _ = resnet20_exports
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dequantizers = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    for name, layer in quantized_layers(model).items():
        weight = f"model.{name}.weight"
        assert weight not in inits  # no float copy left behind
        codes, scale, zero = (inits[weight + suffix] for suffix in ("_quantized", "_scale", "_zero_point"))
        out = layer.weight.shape[0]
        assert codes.dtype == np.int8 and codes.shape == tuple(layer.weight.shape)
        assert scale.dtype == np.float32 and scale.shape == (out,) and (scale > 0).all()
        assert zero.dtype == np.int8 and zero.shape == (out,) and not zero.any()
        axis = {a.name: a.i for a in dequantizers[weight].attribute}["axis"]
        assert axis == 0
        if layer.precision == "ternary":
            assert set(np.unique(codes).tolist()) <= {-1, 0, 1}
        else:
            assert np.abs(codes).max() == 127
    # fc has no BN after it: its per-tensor scale is repeated per channel, its codes are PyTorch's
    fc_scale = inits["model.fc.weight_scale"]
    assert (fc_scale == model.fc.weight_scale().item()).all()
    assert np.array_equal(inits["model.fc.weight_quantized"], model.fc.weight_codes().numpy())
    # a BN-folded conv keeps PyTorch's zero pattern (gamma only rescales/flips channels)
    folded = inits["model.layer1.0.conv1.weight_quantized"]
    assert np.array_equal(folded == 0, model.layer1[0].conv1.weight_codes().numpy() == 0)
    assert "quantization" in read_onnx_metadata(path)
    _, test = tiny
    for deployed in (False, True):  # with float inputs, onnxruntime's optimizer changes nothing measurable
        check = check_qdq(model, path, test, threads=1, runtime_optimizations=deployed)
        assert check.images == 100 and check.top1_agreement == 100.0 and check.max_abs_diff < 1e-4


def test_qdq_int8_inputs_have_static_per_tensor_scales(trained_int8_inputs, tiny, tmp_path):
    result = trained_int8_inputs[0]
    model = result.model
    path = export_qdq(model, tmp_path / "act.onnx", SPEC, CLASSES)
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    quantizers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 22  # one per quantized layer input, shortcut convs included
    for name, layer in quantized_layers(model).items():
        scale = inits[f"{name}.input_scale"]
        assert scale.shape == () and scale == layer.static_input_scale().item()
        assert inits[f"{name}.input_zero_point"].dtype == np.int8
    _, test = tiny
    check = check_qdq(model, path, test.images, threads=1)  # the graph as written
    assert check.top1_agreement == 100.0 and check.max_abs_diff < 1e-4
    # as deployed, onnxruntime quantizes conv biases to int32: within 2% of the logit range, and
    # only near-tied predictions (here one image with a top-2 margin of ~1e-4) may flip
    # On a CPU without VNNI cifarpress also runs the 8-bit first conv and classifier with 7-bit weights
    # (ort_lowering.reduce_weight_range), which moves the logits further than the bias rounding alone.
    from cifarpress.runtime.host import int8_kernels_exact

    exact = int8_kernels_exact()
    deployed = check_qdq(model, path, test.images, threads=1, runtime_optimizations=True,
                         tolerance=None if exact else float("inf"))
    assert deployed.top1_agreement >= (98.0 if exact else 95.0)


def test_qdq_export_needs_a_quantized_model_with_ranges(tmp_path):
    with pytest.raises(CifarpressError, match="no ternary or int8 layers"):
        export_qdq(small_net(), tmp_path / "x.onnx", SPEC, CLASSES)
    model = small_net()
    quantize_model(model, TernaryConfig(act_bits=8))
    with pytest.raises(CifarpressError, match="calibrate_activations"):
        export_qdq(model, tmp_path / "x.onnx", SPEC, CLASSES)
    assert not (tmp_path / "x.onnx").exists()


# -- the packed artifact ---------------------------------------------------------------

def test_ternary_2bit_code():
    assert pack_ternary(np.array([1, -1, 0, 1])).tolist() == [0b01_00_10_01]  # first weight in the low bits
    codes = np.random.default_rng(0).integers(-1, 2, size=4 * 7 + 3)
    packed = pack_ternary(codes)
    assert packed.dtype == np.uint8 and len(packed) == 8
    assert np.array_equal(unpack_ternary(packed, len(codes)), codes)
    with pytest.raises(ValueError):
        unpack_ternary(np.array([0b11], np.uint8), 1)
    with pytest.raises(ValueError):
        pack_ternary(np.array([2]))


@pytest.mark.parametrize("config", [TernaryConfig(), TernaryConfig(scale="absmedian", granularity="channel",
                                                                   act_bits=8, keep=["3"])])
def test_packed_round_trip_is_bit_exact(config, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("cifarpress.export.packed.build_model", lambda arch, n, **_: small_net(seed=5))
    model = randomize_batchnorm(small_net())
    quantize_model(model, config)
    x = normalized(tiny[1].images[:50])
    if config.act_bits:
        calibrate_activations(model, x)
    path = save_packed(model.eval(), tmp_path / "m.cpt", "small", 10, "cifar10", {"note": "test"})
    loaded = load_packed(path)
    original_layers, loaded_layers = quantized_layers(model), quantized_layers(loaded)
    assert list(original_layers) == list(loaded_layers)
    for name, layer in original_layers.items():
        again = loaded_layers[name]
        assert type(again) is type(layer)
        assert torch.equal(again.quantized_weight(), layer.quantized_weight())
        assert torch.equal(again.weight_codes(), layer.weight_codes())  # re-quantizing reproduces the codes
        assert torch.equal(again.weight_scale(), layer.weight_scale())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    header = read_packed_header(path)
    assert header["arch"] == "small" and header["meta"] == {"note": "test"} and header["config"]["scale"] == config.scale
    header_len = struct.unpack_from("<I", path.read_bytes(), len(MAGIC))[0]
    assert path.stat().st_size == len(MAGIC) + 4 + header_len + sum(header["payload_bytes"].values())


def test_packed_resnet20_is_a_tenth_of_fp32_onnx(resnet20_exports, tiny):
    model, fp32_path, _, packed_path = resnet20_exports
    packed, fp32 = packed_path.stat().st_size, fp32_path.stat().st_size
    assert packed <= fp32 / 10, (packed, fp32)
    ternary = sum(m.weight.numel() for m in quantized_layers(model).values() if m.precision == "ternary")
    assert read_packed_header(packed_path)["payload_bytes"]["ternary"] == sum(
        math.ceil(m.weight.numel() / 4) for m in quantized_layers(model).values() if m.precision == "ternary")
    assert ternary > 0.27e6 * 0.95
    loaded = load_packed(packed_path)
    x = normalized(tiny[1].images[:20])
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_packed_file_errors(tmp_path):
    bad = tmp_path / "bad.cpt"
    bad.write_bytes(b"not a packed model")
    with pytest.raises(CifarpressError, match="bad magic"):
        load_packed(bad)
    with pytest.raises(CifarpressError, match="not found"):
        load_packed(tmp_path / "missing.cpt")
    model = small_net()
    quantize_model(model)
    good = save_packed(model, tmp_path / "m.cpt", "resnet20", 10, "cifar10")
    bad.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(CifarpressError, match="truncated or corrupt"):
        load_packed(bad)
    with pytest.raises(CifarpressError, match="not quantized|no ternary or int8 layers"):
        save_packed(small_net(), tmp_path / "f.cpt", "resnet20", 10, "cifar10")


@pytest.mark.parametrize("method", ["absmean", "absmedian"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_scale_is_the_same_with_the_cut_channels_zeroed_or_gone(method, per_channel):
    """A pruner in the same pass zeroes channels, then cuts them: the scale must not move in between."""
    from cifarpress.techniques.quantize.fake_quant import ternary_scale

    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    padded = torch.zeros(8, 7, 3, 3)
    padded[:6, :5] = w  # two zeroed output rows and two zeroed input columns around the same weights
    kept, zeroed = ternary_scale(w, method, per_channel), ternary_scale(padded, method, per_channel)
    assert torch.allclose(zeroed[:6] if per_channel else zeroed, kept)
    reference = w.abs().mean() if method == "absmean" else w.abs().median()
    assert per_channel or float(kept) == pytest.approx(float(reference), rel=1e-6)
