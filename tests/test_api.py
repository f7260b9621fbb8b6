"""The Python API (`from cifarpress import ...`) on a user's own model and plain DataLoaders, not the CLI.

The model is defined here and takes 3x64x64 images, so every stage has to take the input shape from the
data (tracer, pruner probes, export, calibration, bench) rather than CIFAR's 32x32.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cifarpress
from cifarpress.errors import CifarpressError
from cifarpress.export.int8 import check_int8_rules
from cifarpress.profile import profile_model
from cifarpress.runtime.onnx_file import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata

CLASSES, SIZE = 4, 64
FAST = {"quiet": True, "device": "cpu"}


class TinyNet(nn.Module):
    """A user's model: not from the zoo, 64x64 inputs, 4 classes."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, CLASSES)

    def forward(self, x):
        return self.head(self.features(x))


def make_loader(n: int = 64, seed: int = 0, shuffle: bool = False, size: int = SIZE) -> DataLoader:
    """Random images whose class sets the mean of one colour channel: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = 0.5 * torch.randn(n, 3, size, size, generator=gen)
    images[torch.arange(n), labels % 3] += torch.where(labels < 3, 1.5, -1.5)[:, None, None]
    return DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


@pytest.fixture(scope="module")
def loaders():
    return make_loader(64, seed=0, shuffle=True), make_loader(32, seed=1)


def test_prune_int8_export_and_bench_a_64px_user_model(loaders, tmp_path):
    train, test = loaders
    dense = model()
    pruned = cifarpress.prune(dense, train, macs=0.5, epochs=2, channel_multiple=4, pruning_periods=2,
                              start_fraction=0.0, end_fraction=1.0, lr=0.05, **FAST)
    shape = (1, 3, SIZE, SIZE)
    assert profile_model(pruned, shape).macs <= 0.5 * profile_model(model(), shape).macs
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model().parameters())

    out = cifarpress.export(pruned, tmp_path / "pruned.int8.onnx", precision="int8", data=test, calibration=train,
                            calibrator="minmax", threads=1)
    assert out.path.is_file() and out.precision == "int8" and out.violations == []
    assert check_int8_rules(out.path) == [] and out.manifest["count"] == 64
    dims = onnx.load(str(out.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1:] == [3, SIZE, SIZE]
    assert out.check.images == 32 and out.top1_drop_pp is not None
    meta = read_onnx_metadata(out.path)
    assert "model's own inputs" in meta["input"] and "64x64" in meta["input"]

    measured = cifarpress.bench(out.path, test, batch_sizes=[1, 3], seconds=0.05, threads=1)
    assert set(measured["latency_ms"]) == {"1", "3"} and measured["latency_ms"]["3"]["p50"] > 0
    assert measured["top1"] == pytest.approx(cifarpress.evaluate(out.path, test, threads=1))
    assert "top1_graph" in measured  # a QDQ file: also its own math


def test_train_learns_on_a_user_loader_and_reports_through_run_stage(loaders, tmp_path):
    train, test = loaders
    net = model()
    before = cifarpress.evaluate(net, test)
    result = cifarpress.run_stage("train", net, train, {"epochs": 3, "lr": 0.1}, test=test, out=tmp_path / "run",
                                  mesa=True, **FAST)
    assert len(result.history) == 3 and result.top1 == pytest.approx(cifarpress.evaluate(result.model, test))
    assert result.top1 > max(60.0, before)  # chance is 25%
    assert all(epoch["saved_bytes"] > 0 for epoch in result.history)  # the mesa add-on ran
    assert (tmp_path / "run" / "last.pt").is_file()
    again = cifarpress.run_stage("train", model(), train, {"epochs": 3, "lr": 0.1}, test=test, out=tmp_path / "run",
                                 mesa=True, **FAST)
    assert again.resumed_from == 3  # the run folder resumes


def test_train_returns_the_model_and_takes_a_config_object(loaders):
    train, _ = loaders
    net = model()
    start = [p.detach().clone() for p in net.parameters()]
    trained = cifarpress.train(net, train, cifarpress.TrainingOptions(epochs=1, lr=0.05), ema=True, **FAST)
    assert isinstance(trained, TinyNet)
    assert any(not torch.equal(a, b) for a, b in zip(start, trained.parameters()))


def test_quantize_then_export_writes_qdq_and_packed_files(loaders, tmp_path):
    train, test = loaders
    quantized = cifarpress.quantize(model(), train, cifarpress.TernaryQuantConfig(), epochs=1, lr=0.02, **FAST)
    from cifarpress.techniques.quantize.ternary import quantized_layers

    assert quantized_layers(quantized)  # fake-quant layers swapped in
    out = cifarpress.export(quantized, tmp_path / "ternary.onnx", data=test, threads=1)
    assert out.precision == "quantized" and out.packed is not None and out.packed.is_file()
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(out.path)).graph.node)
    with pytest.raises(CifarpressError, match="already quantized"):
        cifarpress.export(quantized, tmp_path / "again.onnx", precision="int8", data=test, calibration=train)


def agreement(a: nn.Module, b: nn.Module, loader) -> float:
    with torch.no_grad():
        pairs = [(a.eval()(x).argmax(1), b.eval()(x).argmax(1)) for x, _ in loader]
    return float(np.mean([float((p == q).float().mean()) for p, q in pairs]))


def test_distill_teaches_the_teachers_answers_not_the_labels(loaders):
    train, test = loaders
    shifted = [(x, (y + 1) % CLASSES) for x, y in train]  # the teacher learns each class's neighbour
    teacher = cifarpress.train(model(seed=7), shifted, epochs=4, lr=0.1, **FAST)
    student = cifarpress.distill(model(seed=3), teacher, train, {"method": "kd", "label_weight": 0.0}, epochs=4,
                                 lr=0.1, **FAST)
    assert agreement(student, teacher, test) > 0.8  # only the KD term trained it
    assert cifarpress.evaluate(student, test) < 50.0


def test_distill_addon_on_prune_takes_a_teacher_model(loaders):
    train, _ = loaders
    result = cifarpress.run_stage("prune", model(), train, sparsity=0.3, epochs=1, channel_multiple=4,
                                  pruning_periods=1, start_fraction=0.0, end_fraction=1.0,
                                  distill={"method": "kd", "teacher": model(seed=5)}, **FAST)
    assert "teacher_time_fraction" in result.history[-1]  # the distillation plug-in ran


def test_int8_calibrates_through_a_forward_loop(loaders, tmp_path):
    train, test = loaders
    net = model()
    seen = []

    def forward_loop(m):
        for images, _ in train:
            seen.append(len(images))
            m(images)

    out = cifarpress.export(net, tmp_path / "loop.int8.onnx", precision="int8", data=test,
                            calibration=forward_loop, calib_images=40, calibrator="minmax", threads=1)
    assert out.manifest["count"] == 40 and sum(seen) == 64


def test_a_float_onnx_file_quantizes_on_user_loaders(tmp_path):
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    shape = (1, 3, 1, 1)

    def normalized(n, seed):  # pixels in [0, 1] through the user's transform, as a DataLoader yields them
        pixels = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        images = (pixels - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
        return DataLoader(TensorDataset(images, torch.arange(n) % CLASSES), batch_size=16)

    train, test = normalized(48, 0), normalized(32, 1)
    float_file = cifarpress.export(model(), tmp_path / "m.onnx", data=test, normalization=(mean, std), threads=1).path
    out = cifarpress.export(float_file, precision="int8", data=test, calibration=train, calibrator="minmax",
                            threads=1)
    assert out.path == tmp_path / "m.int8.onnx" and check_int8_rules(out.path) == []
    assert out.check.top1_agreement >= 75.0  # against the float file, on the loader's images mapped to pixels
    with pytest.raises(CifarpressError, match="already quantized"):
        cifarpress.export(out.path, precision="int8", data=test, calibration=train)


def test_float_export_with_normalization_takes_pixels(tmp_path):
    import onnxruntime as ort

    net = model().eval()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = cifarpress.export(net, tmp_path / "norm.onnx", input_shape=(3, SIZE, SIZE), normalization=(mean, std),
                            threads=1)
    assert out.check.images > 0 and out.check.max_abs_diff < 1e-4  # checked on random inputs
    pixels = torch.rand(2, 3, SIZE, SIZE)
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0]
    expected = net((pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert np.allclose(got, expected.detach().numpy(), atol=1e-4)
    assert "pixel values in [0, 1]" in read_onnx_metadata(out.path)["input"]


def test_compare_times_files_side_by_side(loaders, tmp_path):
    _, test = loaders
    a = cifarpress.export(model(1), tmp_path / "a.onnx", data=test, threads=1).path
    b = cifarpress.export(TinyNet(width=8), tmp_path / "b.onnx", data=test, threads=1).path
    result = cifarpress.compare([a, b], test, batch_sizes=[2], seconds=0.05, rounds=1, threads=1)
    first, second = result["models"]
    assert first["size_vs_first"] == 1.0 and second["size_vs_first"] < 1.0
    assert second["top1_delta_pp"] == pytest.approx(second["top1"] - first["top1"])


def test_run_recipe_takes_a_mapping(tiny_cifar_root, tmp_path):
    recipe = {"name": "api", "data_root": str(tiny_cifar_root), "model": {"arch": "resnet20",
              "checkpoint": "builtin:resnet20-cifar10"}, "stages": ["export"],
              "bench": {"batch_sizes": [1], "seconds": 0.05, "threads": 1, "rounds": 1}}
    run_dir = cifarpress.run_recipe(recipe, tmp_path / "run")
    assert (run_dir / "report.json").is_file() and (run_dir / "01-export" / "model.onnx").is_file()


@pytest.mark.parametrize("call, needle", [
    (lambda d: cifarpress.prune(model(), d, macs=1.5), "macs"),
    (lambda d: cifarpress.prune(model(), d, macs=0.5, sparsity=0.5), "exactly one target"),
    (lambda d: cifarpress.train(model(), d, epochs=0), "epochs"),
    (lambda d: cifarpress.train(model(), ((x, y) for x, y in d)), "one-shot iterator"),
    (lambda d: cifarpress.train(model(), [torch.zeros(2, 3, SIZE, SIZE)]), "not \\(images, labels\\)"),
    (lambda d: cifarpress.train(model(), d, distill="kd"), "distill"),
    (lambda d: cifarpress.export(model(), "x.onnx", precision="int8", data=d), "calibration"),
    (lambda d: cifarpress.export(model(), "x.onnx", data=d, input_shape=(3, 32, 32)), "disagree"),
    (lambda d: cifarpress.train(model(), "imagenet"), "unknown dataset"),
    (lambda d: cifarpress.bench("missing.onnx"), "not found"),
    (lambda d: cifarpress.train(object(), d), "the model is a object; give a torch model"),
    (lambda d: cifarpress.prune("missing-model.pt", d, macs=0.5), "missing-model.pt"),
])
def test_bad_input_is_one_line_naming_the_fix(loaders, call, needle):
    with pytest.raises(CifarpressError, match=needle) as info:
        call(loaders[0])
    assert "\n" not in str(info.value)


def test_a_model_that_rejects_the_data_shape_is_named(loaders):
    small = make_loader(8, size=16)
    with pytest.raises(CifarpressError, match=r"shape \(2, 3, 16, 16\)"):
        cifarpress.prune(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES)), small, macs=0.5)


def test_import_is_light_and_lists_the_api():
    code = ("import sys, cifarpress; names = dir(cifarpress); "
            "print('torch' in sys.modules, all(n in names for n in cifarpress.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "True"], proc.stderr
    assert callable(cifarpress.export) and cifarpress.export.onnx.OPSET  # the subpackage stays a package
    assert Path(cifarpress.train.trainer.__file__).name == "trainer.py"


def test_stage_config_merges_a_technique_config_with_options_and_names_a_bad_field():
    body = cifarpress.stage_config("prune", cifarpress.HessoConfig(macs=0.5), epochs=3, distill={"method": "kd"})
    assert body.method == "hesso" and body.macs == 0.5 and body.epochs == 3 and body.distill.method == "kd"
    gating = cifarpress.stage_config("prune", {"method": "gating", "sparsity": 0.3})
    assert isinstance(gating, cifarpress.GatingConfig) or gating.method == "gating"
    with pytest.raises(CifarpressError, match="macs"):
        cifarpress.stage_config("prune", method="hesso", macs=1.5)


def test_a_model_named_by_file_or_builtin_is_loaded():
    trained = cifarpress.train("builtin:resnet20-cifar10", make_loader(40, size=32), epochs=1,
                               max_steps_per_epoch=1, batch_size=20, **FAST)
    assert isinstance(trained, nn.Module) and trained.fc.out_features == 10
