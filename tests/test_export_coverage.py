"""Issue 25, exports: shared weights, token Linears, Conv2d/Linear subclasses, parity at large logits."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from cifarpress.data import dataset_spec
from cifarpress.errors import CifarpressError
from cifarpress.export.int8 import check_int8_rules, export_int8_qdq, int8_layers, quantize_onnx_int8
from cifarpress.export.onnx import ExportCheckError, NormalizedClassifier, check_onnx, export_onnx
from cifarpress.export.qdq import check_qdq, export_qdq
from cifarpress.runtime.ort import make_session
from cifarpress.techniques.quantize.fake_quant import FakeQuantLayer
from cifarpress.techniques.quantize.ternary import (
    TernaryConfig,
    calibrate_activations,
    computes_as_parent,
    quantizable_layers,
    quantize_model,
)

SPEC = dataset_spec("cifar10")
CLASSES = [str(i) for i in range(10)]


from test_ternary import normalized, tiny  # noqa: E402,F401  (the tiny splits fixture and input normalization)


def centred_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def float_logits(model: nn.Module, pixels: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return NormalizedClassifier(model, SPEC.mean, SPEC.std).eval()(pixels).numpy()


# -- 1. one conv called twice ----------------------------------------------------------------

class SharedConv(nn.Module):
    """One conv (one weight) applied twice in the forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = torch.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))


def test_int8_export_of_a_conv_called_twice_shares_its_codes(tiny, tmp_path):
    train, test = tiny
    model = SharedConv().eval()
    path = export_int8_qdq(model, tmp_path / "shared.onnx", SPEC, CLASSES, train.images[:64], "minmax", threads=1)
    assert check_int8_rules(path) == []
    graph = onnx.load(str(path)).graph
    names = {t.name for t in graph.initializer}
    assert "model.conv.weight" not in names and "model.conv.weight_quantized" in names  # one copy of the codes
    dequantizers = [n for n in graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] == "model.conv.weight_quantized"]
    convs = [n for n in graph.node if n.op_type == "Conv" and n.input[1].startswith("model.conv.weight")]
    assert len(dequantizers) == len(convs) == 2  # each reader its own DQ of the shared codes
    assert {n.input[1] for n in convs} == {d.output[0] for d in dequantizers}
    pixels = test.images[:50].float() / 255
    logits = make_session(path, 1).run(["logits"], {"input": pixels.numpy()})[0]
    assert centred_cosine(logits, float_logits(model, pixels)) > 0.99


def test_int8_export_keeps_the_float_weight_for_an_excluded_second_call(tiny, tmp_path):
    train, _ = tiny
    float_path = export_onnx(SharedConv().eval(), tmp_path / "float.onnx", SPEC, CLASSES)
    assert sorted(int8_layers(onnx.load(str(float_path)).graph).values()) == ["conv", "conv#2", "fc", "stem"]
    partial = quantize_onnx_int8(float_path, tmp_path / "partial.onnx", train.images[:64], "minmax", threads=1,
                                 exclude=["conv#2"])
    graph = onnx.load(str(partial)).graph
    readers = [n.input[1] for n in graph.node if n.op_type == "Conv" and n.input[1].startswith("model.conv.weight")]
    assert sorted(readers) == ["model.conv.weight", "model.conv.weight_dequantized"]  # the float reader keeps it
    assert check_int8_rules(partial) == []


def test_ternary_qdq_of_a_conv_called_twice(tiny, tmp_path):
    train, test = tiny
    model = SharedConv()
    quantize_model(model, TernaryConfig(keep=[], act_bits=8))
    calibrate_activations(model, normalized(train.images[:64]))
    path = export_qdq(model, tmp_path / "shared-ternary.onnx", SPEC, CLASSES)
    check_qdq(model, path, test.images[:50], threads=1)  # raises past its tolerance


# -- 2. a Linear on token tensors -------------------------------------------------------------

class TokenMixer(nn.Module):
    """A patch stem, then Linears on (B, N, C) tokens (exported as MatMul with the weight transposed)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.mix = nn.Linear(16, 24)
        self.out = nn.Linear(24, 16, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.out(torch.relu(self.mix(tokens)))
        return self.fc(tokens.mean(1))


@pytest.mark.parametrize("act_bits", [None, 8])
def test_ternary_qdq_of_token_linears(tiny, tmp_path, act_bits):
    train, test = tiny
    model = TokenMixer()
    precisions = quantize_model(model, TernaryConfig(granularity="channel", act_bits=act_bits, keep=["stem", "out"]))
    assert precisions == {"stem": "int8", "mix": "ternary", "out": "int8", "fc": "ternary"}
    if act_bits:
        calibrate_activations(model, normalized(train.images[:64]))
    path = export_qdq(model, tmp_path / "tokens.onnx", SPEC, CLASSES)
    graph = onnx.load(str(path)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for name, inputs, outputs in (("mix", 16, 24), ("out", 24, 16)):
        codes = initializers[f"model.{name}.weight_quantized"]
        assert codes.dtype == np.int8 and codes.shape == (inputs, outputs)  # MatMul's (in, out) layout
        dq = next(n for n in graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] == f"model.{name}.weight_quantized")
        assert [a.i for a in dq.attribute if a.name == "axis"] == [1]  # per output channel
        assert initializers[f"model.{name}.weight_scale"].shape == (outputs,)
        assert any(n.op_type == "MatMul" and n.input[1] == dq.output[0] for n in graph.node)
    assert set(np.unique(initializers["model.mix.weight_quantized"])) <= {-1, 0, 1}
    check_qdq(model, path, test.images[:50], threads=1)  # raises past its tolerance
    check_qdq(model, path, test.images[:50], threads=1, runtime_optimizations=True,
              tolerance=float("inf"))  # onnxruntime's fused kernels take the graph too


def test_qdq_export_from_the_torchscript_fallback_names_the_layer(torchscript_only_export, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 30 * 30, 10))
    quantize_model(model, TernaryConfig(keep=[]))
    with pytest.raises(CifarpressError, match=r"^layer '0' has no weight initializer .*dynamo exporter could not "
                                              r"trace the model[^\n]*$"):
        export_qdq(model.eval(), tmp_path / "x.onnx", SPEC, CLASSES)


# -- 3. Conv2d / Linear subclasses ------------------------------------------------------------

class TimmLinear(nn.Linear):
    """As timm.layers.Linear (timm 1.0): its own forward, the parent's computation."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            bias = self.bias.to(dtype=input.dtype) if self.bias is not None else None
            return F.linear(input, self.weight.to(dtype=input.dtype), bias=bias)
        return F.linear(input, self.weight, self.bias)


class PlainConv(nn.Conv2d):
    """A subclass that only renames nn.Conv2d."""


class StdConv2d(nn.Conv2d):
    """Weight-standardized conv, as timm's StdConv2d: the forward transforms the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return self._conv_forward(x, weight, self.bias)


class GainConv(nn.Conv2d):
    """The parent's forward but an extra learnable gain the swap would drop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * self.gain, bias)


class Subclassed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = PlainConv(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.std = StdConv2d(8, 16, 3, stride=2, padding=1)
        self.gain = GainConv(16, 16, 3, padding=1)
        self.proj = nn.Conv2d(16, 16, 1)
        self.head = TimmLinear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.std(x))
        x = torch.relu(self.proj(self.gain(x)))
        return self.head(x.mean((2, 3)))


def test_subclasses_that_compute_as_the_parent_are_quantized_others_warn():
    model = Subclassed()
    assert computes_as_parent(model.head, nn.Linear) and computes_as_parent(model.stem, nn.Conv2d)
    assert not computes_as_parent(model.std, nn.Conv2d) and not computes_as_parent(model.gain, nn.Conv2d)
    assert list(quantizable_layers(model)) == ["stem", "proj", "head"]
    with pytest.warns(UserWarning, match=r"'std' \(StdConv2d\), 'gain' \(GainConv\)") as caught:
        precisions = quantize_model(model)
    assert len([w for w in caught if "leaves these" in str(w.message)]) == 1  # one warning, naming each layer
    assert precisions == {"stem": "int8", "proj": "ternary", "head": "int8"}  # the timm-style head is the classifier
    assert isinstance(model.head, FakeQuantLayer) and isinstance(model.stem, FakeQuantLayer)
    assert type(model.std) is StdConv2d and type(model.gain) is GainConv  # left float, as the warning says


def test_plain_models_quantize_without_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), TimmLinear(8 * 30 * 30, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantize_model(model) == {"0": "int8", "3": "int8"}


def test_a_weight_mean_in_the_forward_exports_through_dynamo(tmp_path):
    """A folded weight.mean() is named "mean" by torch.onnx: the wrapper's own buffers must not be."""

    class Centred(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, self.weight - self.weight.mean(), self.bias)

    model = nn.Sequential(Centred(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).eval()
    graph = onnx.load(str(export_onnx(model, tmp_path / "centred.onnx", SPEC, CLASSES))).graph
    assert any(p.key == "namespace" for n in graph.node for p in n.metadata_props)  # not the TorchScript fallback


def test_quantized_subclass_model_exports_and_checks(tiny, tmp_path):
    _, test = tiny
    model = Subclassed()
    with pytest.warns(UserWarning):
        quantize_model(model, TernaryConfig(keep=["head"]))
    model.eval()
    path = export_qdq(model, tmp_path / "subclassed.onnx", SPEC, CLASSES)
    check_qdq(model, path, test.images[:50], threads=1)  # raises past its tolerance


# -- 4. parity tolerance relative to the logits ------------------------------------------------

def large_logit_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        model[-1].weight.mul_(3e4)  # logits of order 1e4
    return model.eval()


def test_check_onnx_tolerance_is_relative_to_the_logits(tiny, tmp_path):
    _, test = tiny
    model = large_logit_net()
    path = export_onnx(model, tmp_path / "large.onnx", SPEC, CLASSES)
    largest = float(np.abs(float_logits(model, test.images.float() / 255)).max())
    assert largest > 2e3
    check = check_onnx(model, path, test, 100, threads=1)  # the default 1e-4, times max(1, largest |logit|)
    assert check.top1_agreement == 100.0 and check.max_abs_diff <= 1e-4 * largest
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[-1].bias.add_(largest * 1e-3)  # an unfaithful file still fails, saying why
    with pytest.raises(ExportCheckError, match=r"differs from PyTorch by .* tolerance 0\.0001 x max\(1, largest "
                                               r"\|logit\| "):
        check_onnx(changed, path, test, 100, threads=1)


def test_weight_only_qdq_tolerance_is_relative_to_the_logits(tiny, tmp_path):
    _, test = tiny
    model = large_logit_net(1)
    quantize_model(model, TernaryConfig(keep=[]))
    path = export_qdq(model, tmp_path / "large-ternary.onnx", SPEC, CLASSES)
    check_qdq(model, path, test.images, threads=1)  # default 1e-4 relative: raises past it
