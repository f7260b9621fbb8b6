"""Per-layer weight bit widths: the generic fake-quant layer, its state, the QDQ export and the packed format."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from cifarpress.data import dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.export.packed import (
    FORMAT,
    FORMAT_NBIT,
    load_packed,
    pack_codes,
    read_packed_header,
    save_packed,
    unpack_codes,
)
from cifarpress.export.qdq import check_qdq, export_qdq
from cifarpress.models import build_model
from cifarpress.runtime.onnx_file import read_onnx_metadata
from cifarpress.techniques.quantize.fake_quant import (
    FakeQuantConv2d,
    FakeQuantLinear,
    absmax_scale,
)
from cifarpress.techniques.quantize.ternary import (
    Int8Conv2d,
    Int8Linear,
    TernaryConfig,
    TernaryConv2d,
    TernaryLinear,
    calibrate_activations,
    config_from_model,
    layer_report,
    quantize_model,
    quantized_layers,
)

from test_ternary import normalized, randomize_batchnorm, small_net  # shared tiny models

SPEC = dataset_spec("cifar10")
CLASSES = [str(i) for i in range(10)]
BENCH_PACKED = Path(__file__).resolve().parents[1] / "bench" / "results" / "resnet20-ternary.packed"


@pytest.fixture(scope="module")
def test_images(tiny_cifar_root):
    return load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)


def mixed_widths(model: nn.Module, bits: dict[str, int]) -> nn.Module:
    for name, width in bits.items():
        quantized_layers(model)[name].set_weight_bits(width)
    return model


# -- ternary and int8 numerics are those of the class-per-precision layers --------------
# The reference is the previous implementation's forward written out with the same torch ops,
# so every comparison below is bit for bit.

def reference_weight(latent: torch.Tensor, ternary: bool, method: str, per_channel: bool) -> torch.Tensor:
    w = latent.detach()
    magnitude = w.abs()
    if ternary:
        if per_channel:
            rows = magnitude.flatten(1)
            stat = (rows.mean(1) if method == "absmean" else rows.median(1).values).view(-1, *[1] * (w.dim() - 1))
        else:
            stat = magnitude.mean() if method == "absmean" else magnitude.median()
        scale, qmax = stat.clamp_min(1e-5), 1
    else:
        scale, qmax = (magnitude.flatten(1).amax(1) / 127).view(-1, *[1] * (w.dim() - 1)).clamp_min(1e-5), 127
    return (w / scale).round().clamp(-qmax, qmax) * scale


def reference_forward(layer, x: torch.Tensor, ternary: bool, config: TernaryConfig, blend: float,
                      absmax: torch.Tensor | None) -> torch.Tensor:
    """Forward of the previous TernaryConv2d/Int8Conv2d/... (training with blend, or eval with a static range)."""
    wq = reference_weight(layer.weight, ternary, config.scale, config.granularity == "channel")
    if blend < 1.0:
        wq = torch.lerp(layer.weight.detach(), wq, blend)
    if config.act_bits:
        with torch.no_grad():
            if absmax is None:  # training: dynamic absmax of the batch or of each image
                per_sample = config.act_granularity == "sample"
                m = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True) if per_sample else x.abs().amax()
                scale = (m / 127).clamp_min(1e-5)
            else:
                scale = (absmax / 127).clamp_min(1e-5)
            x = (x / scale).round().clamp(-128, 127) * scale
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, wq, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, wq, layer.bias)


CONFIGS = [TernaryConfig(), TernaryConfig(scale="absmedian", granularity="channel"),
           TernaryConfig(act_bits=8), TernaryConfig(act_bits=8, act_granularity="sample", granularity="channel")]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "absmedian-channel", "act8", "act8-sample"])
@pytest.mark.parametrize("cls", [TernaryConv2d, Int8Conv2d, TernaryLinear, Int8Linear], ids=lambda c: c.__name__)
def test_ternary_and_int8_numerics_are_unchanged(cls, config):
    torch.manual_seed(0)
    conv = issubclass(cls, nn.Conv2d)
    plain = nn.Conv2d(4, 6, 3, padding=1) if conv else nn.Linear(12, 7)
    x = torch.randn(5, 4, 8, 8) if conv else torch.randn(5, 12)
    layer = cls.from_float(plain, config, "l").train()
    ternary = cls in (TernaryConv2d, TernaryLinear)
    assert layer.precision == ("ternary" if ternary else "int8") and layer.qmax == (1 if ternary else 127)
    for blend in (0.3, 1.0):
        layer.blend = blend
        assert torch.equal(layer(x), reference_forward(layer, x, ternary, config, blend, None))
    layer.eval()
    absmax = layer.act_absmax.clone() if config.act_bits else None
    expected = reference_forward(layer, x, ternary, config, 1.0, absmax)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        layer.freeze()  # deployed form gives the same output
        assert torch.equal(layer(x), expected)
    assert torch.equal(layer.weight, reference_weight(plain.weight, ternary, config.scale,
                                                      config.granularity == "channel"))


# -- the width is per-layer state ---------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16])
def test_runtime_bits_set_the_code_range(bits):
    torch.manual_seed(0)
    layer = TernaryConv2d.from_float(nn.Conv2d(4, 6, 3))
    assert layer.precision == "ternary" and set(layer.weight_codes().unique().tolist()) <= {-1.0, 0.0, 1.0}
    layer.set_weight_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    codes, scale = layer.weight_codes(), layer.weight_scale()
    assert layer.qmax == qmax and layer.bits == bits and layer.precision == f"int{bits}"
    assert int(layer.weight_bits) == bits and isinstance(layer, TernaryConv2d)  # the class only names the start
    assert torch.equal(codes, codes.round()) and codes.flatten(1).abs().amax(1).tolist() == [qmax] * 6
    assert torch.equal(scale, absmax_scale(layer.weight, qmax)) and scale.shape == (6, 1, 1, 1)
    assert (layer.quantized_weight() - layer.weight).abs().le(scale / 2 + 1e-7).all()
    assert torch.isfinite(layer(torch.randn(2, 4, 5, 5))).all()
    layer.set_weight_bits("ternary")  # and back
    assert layer.precision == "ternary" and layer.weight_codes().abs().max() == 1


def test_width_changes_reach_every_copy_of_the_buffer():
    layer = FakeQuantLinear(8, 4, weight_bits=4)
    assert layer.precision == "int4" and layer.qmax == 7
    # in-place writes, as the EMA's copy_ and DDP's broadcast make them, are seen at the next read
    layer.weight_bits.copy_(torch.tensor(6))
    assert layer.qmax == 31 and layer.weight_codes().abs().max() == 31
    twin = copy.deepcopy(layer)
    twin.set_weight_bits(3)
    assert twin.qmax == 3 and layer.qmax == 31
    layer.set_weight_bits("int2")
    assert layer.weight_codes().abs().max() == 1 and "weights=int2" in repr(layer)
    for bad in (1, 33, 0.5, True, "int", "int4.5", "binary"):
        with pytest.raises(CifarpressError, match="is not a weight precision"):
            layer.set_weight_bits(bad)
    with pytest.raises(CifarpressError, match="is not a weight precision"):
        FakeQuantConv2d(3, 4, 3, weight_bits=33)


def test_a_deployed_layer_leaves_deployed_form_when_its_width_changes():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(nn.Linear(10, 3))
    layer.freeze()
    layer.set_weight_bits(8)  # no change: stays deployed
    assert layer.frozen_scale is not None
    layer.set_weight_bits(4)
    assert layer.frozen_scale is None  # the old scale belongs to the old grid
    assert layer.weight_codes().abs().amax(1).tolist() == [7.0] * 3


def test_state_dict_round_trip_restores_per_layer_bits(tmp_path):
    from cifarpress.model_file import load_model, save_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    quantize_model(model)
    widths = {"conv1": 6, "layer1.0.conv1": 4, "layer2.0.shortcut.0": 2, "fc": 5}
    mixed_widths(model, widths).eval()
    precisions = {n: m.precision for n, m in quantized_layers(model).items()}
    again = build_model("resnet20", 10)
    quantize_model(again, config_from_model(model))
    again.load_state_dict(model.state_dict())  # strict: weight_bits is an ordinary entry
    assert {n: m.precision for n, m in quantized_layers(again).items()} == precisions
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
    save_model(tmp_path / "m.pt", model, "resnet20", 10, "cifar10")
    loaded, _ = load_model(tmp_path / "m.pt")
    assert {n: m.precision for n, m in quantized_layers(loaded).items()} == precisions
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    report = {r["name"]: r for r in layer_report(loaded)}
    assert report["layer1.0.conv1"]["precision"] == "int4" and report["layer1.0.conv1"]["bits"] == 4
    assert report["layer1.0.conv1"]["weight_bytes"] == math.ceil(16 * 16 * 9 * 4 / 8)
    assert report["layer1.0.conv2"]["bits"] == 1.58 and report["fc"]["weight_bytes"] == math.ceil(640 * 5 / 8)


def test_state_dict_from_before_per_layer_bits_loads(tmp_path):
    from cifarpress.model_file import load_model, save_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    quantize_model(model, TernaryConfig(act_bits=8))
    calibrate_activations(model, torch.randn(8, 3, 32, 32))
    old_state = {k: v for k, v in model.state_dict().items() if not k.endswith("weight_bits")}
    assert len(old_state) < len(model.state_dict())
    again = build_model("resnet20", 10)
    quantize_model(again, TernaryConfig(act_bits=8))
    mixed_widths(again, {"layer1.0.conv1": 4})  # an absent entry leaves the layer's current width alone
    result = again.load_state_dict(old_state)  # strict, and nothing reported missing
    assert not result.missing_keys and not result.unexpected_keys
    assert again.layer1[0].conv1.precision == "int4" and again.conv1.precision == "int8"
    # a model file written before the buffer existed: load_model fails on any missing key
    path = save_model(tmp_path / "old.pt", model, "resnet20", 10, "cifar10")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.endswith("weight_bits")}
    torch.save(payload, path)
    loaded, _ = load_model(path)
    assert {n: m.precision for n, m in quantized_layers(loaded).items()} == \
        {n: m.precision for n, m in quantized_layers(model).items()}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    bad = dict(model.state_dict(), **{"conv1.weight_bits": torch.tensor(40)})
    with pytest.raises(RuntimeError, match="conv1.weight_bits=40"):
        again.load_state_dict(bad)


# -- QDQ export ----------------------------------------------------------------------------

@pytest.mark.parametrize("act_bits", [None, 8])
def test_qdq_export_of_4bit_layers_is_faithful(act_bits, test_images, tmp_path):
    model = randomize_batchnorm(small_net())
    quantize_model(model, TernaryConfig(act_bits=act_bits))
    mixed_widths(model, {"0": 4, "3": 4, "8": 6}).eval()  # BN-folded convs and the plain classifier
    if act_bits:
        calibrate_activations(model, normalized(test_images.images[:50]))
    path = export_qdq(model, tmp_path / "q.onnx", SPEC, CLASSES)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name, qmax in (("0", 7), ("3", 7), ("8", 31)):
        codes = inits[f"model.{name}.weight_quantized"]
        assert codes.dtype == np.int8 and np.abs(codes).max() == qmax
    assert np.array_equal(inits["model.8.weight_quantized"], model[8].weight_codes().numpy())  # no BN: as is
    meta = read_onnx_metadata(path)
    assert '"int4"' in meta["quantization"] and "n-bit" in meta["quantization"]
    check = check_qdq(model, path, test_images, threads=1)  # raises past its tolerance (see check_qdq)
    if not act_bits:
        assert check.top1_agreement == 100.0 and check.max_abs_diff < 1e-4


def test_qdq_export_keeps_layers_wider_than_8_bits_float(test_images, tmp_path):
    model = mixed_widths(quantize_model_of(small_net(), TernaryConfig(act_bits=8)), {"3": 12}).eval()
    calibrate_activations(model, normalized(test_images.images[:50]))
    path = export_qdq(model, tmp_path / "x.onnx", SPEC, CLASSES)
    graph = onnx.load(str(path)).graph
    inits = {t.name for t in graph.initializer}
    assert "model.3.weight_quantized" not in inits and "model.0.weight_quantized" in inits
    quantized_inputs = {n.name for n in graph.node if n.op_type == "QuantizeLinear"}
    assert "3.input_quantize" not in quantized_inputs and "0.input_quantize" in quantized_inputs
    assert '"int12 (float)"' in read_onnx_metadata(path)["quantization"]
    check_qdq(model, path, test_images, threads=1)  # raises past its tolerance


def quantize_model_of(model: nn.Module, config: TernaryConfig | None = None) -> nn.Module:
    quantize_model(model, config)
    return model


# -- the packed format ---------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 33))
def test_nbit_codes_pack_into_b_bits(bits):
    qmax = 2 ** (bits - 1) - 1
    codes = np.random.default_rng(bits).integers(-qmax, qmax + 1, size=37)
    codes[:2] = [-qmax, qmax]
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and len(packed) == math.ceil(37 * bits / 8)
    assert np.array_equal(unpack_codes(packed, 37, bits), codes)
    with pytest.raises(ValueError):
        pack_codes(np.array([qmax + 1]), bits)
    with pytest.raises(ValueError):  # the all-ones pattern (qmax + 1 after the offset) is never written
        unpack_codes(np.full(math.ceil(bits / 8), 0xFF, np.uint8), 1, bits)


def test_nbit_bit_layout():
    # 4-bit: code c is stored as c + 7; the first weight sits in the low bits of byte 0
    assert pack_codes(np.array([-7, 7, 0]), 4).tolist() == [0b1110_0000, 0b0000_0111]
    # 3-bit codes run across byte boundaries: offsets 6, 0, 5 -> stream 011 000 101 (LSB first)
    assert pack_codes(np.array([3, -3, 2]), 3).tolist() == [0b01_000_110, 0b1]


def test_packed_round_trip_with_2_4_6_bit_layers(test_images, tmp_path, monkeypatch):
    monkeypatch.setattr("cifarpress.export.packed.build_model", lambda arch, n, **_: small_net(seed=5))
    model = randomize_batchnorm(small_net())
    quantize_model(model, TernaryConfig(act_bits=8, keep=["8"]))
    mixed_widths(model, {"0": 2, "3": 4, "8": 6})
    x = normalized(test_images.images[:50])
    calibrate_activations(model, x)
    path = save_packed(model.eval(), tmp_path / "m.cpt", "small", 10, "cifar10")
    header = read_packed_header(path)
    assert header["format"] == FORMAT_NBIT and header["layers"] == {"0": "int2", "3": "int4", "8": "int6"}
    encodings = {name: enc for name, enc, _ in header["tensors"]}
    assert [encodings[f"{n}.weight"] for n in ("0", "3", "8")] == ["nbit2", "nbit4", "nbit6"]
    assert not any(name.endswith("weight_bits") for name in encodings)  # the header's precision carries it
    assert header["payload_bytes"]["int4"] == math.ceil(16 * 8 * 9 * 4 / 8)
    assert header["payload_bytes"]["int6"] == math.ceil(160 * 6 / 8)
    loaded = load_packed(path)
    for name, layer in quantized_layers(model).items():
        again = quantized_layers(loaded)[name]
        assert again.precision == layer.precision and again.frozen_scale is not None
        assert torch.equal(again.weight_codes(), layer.weight_codes())
        assert torch.equal(again.quantized_weight(), layer.quantized_weight())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a ternary + int8 model is still written in the first format, so older readers keep reading it
    plain = quantize_model_of(small_net())
    assert read_packed_header(save_packed(plain, tmp_path / "t.cpt", "small", 10, "cifar10"))["format"] == FORMAT


@pytest.mark.skipif(not BENCH_PACKED.is_file(), reason="the shipped bench artifact is not in this checkout")
def test_shipped_ternary_packed_file_loads_unchanged(tmp_path):
    header = read_packed_header(BENCH_PACKED)
    model = load_packed(BENCH_PACKED)
    # writing it again gives the same bytes: codes, scales, widths and the rest survive as they were
    again = save_packed(model, tmp_path / "again.packed", header["arch"], header["num_classes"], header["dataset"],
                        header["meta"])
    assert again.read_bytes() == BENCH_PACKED.read_bytes()
    # and the loaded model computes with exactly the weights the file holds: a float resnet20 given
    # codes * scale gives the same logits bit for bit
    plain = build_model(header["arch"], header["num_classes"])
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("weight_bits", "frozen_scale"))}
    for name, layer in quantized_layers(model).items():
        state[f"{name}.weight"] = layer.weight_codes() * layer.weight_scale()
    plain.load_state_dict(state)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), plain.eval()(x))
    assert {m.precision for m in quantized_layers(model).values()} == {"ternary", "int8"}
