"""TensorRT engines (build, run, time) and Jetson tegrastats (parse, sample).

Everywhere: the one-line errors when TensorRT or a GPU is missing, build_engine's
own logic against a stand-in for the TensorRT 10 API, and the tegrastats parser
and sampler against fixture lines in each JetPack layout. With TensorRT and a CUDA
GPU present, the tests marked `needs_gpu` build real FP16 and INT8 engines and
compare them with onnxruntime.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import string
import sys
import time
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cifarpress.runtime import tensorrt as trt_engine
from cifarpress.data import dataset_spec, load_split
from cifarpress.errors import CifarpressError
from cifarpress.runtime.onnx_file import INPUT_NAME, OUTPUT_NAME
from cifarpress.runtime.tegrastats import TegraStatsSampler, parse_line, parse_lines, summarize

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"
SPEC = dataset_spec("cifar10")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                               reason="needs TensorRT and an NVIDIA GPU")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# -- small ONNX files, written directly (no torch export) ---------------------------------------

def tiny_onnx(path: Path, qdq: bool = False, scale: float = 1.0) -> Path:
    """input [N,3,32,32] -> Flatten -> Gemm -> logits [N,10]; with qdq, the weight passes a DequantizeLinear."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1)]
    if qdq:
        inits = [numpy_helper.from_array(rng.integers(-1, 2, (3072, 10)).astype(np.int8), "w_q"),
                 numpy_helper.from_array(np.array(0.01 * scale, np.float32), "w_scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"]))
    else:
        inits = [numpy_helper.from_array((rng.standard_normal((3072, 10)) * 0.01 * scale).astype(np.float32), "w")]
    nodes.append(helper.make_node("Gemm", ["flat", "w"], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    entry = model.metadata_props.add()
    entry.key, entry.value = "dataset", "cifar10"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def float_onnx(tmp_path) -> Path:
    return tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def qdq_onnx(tmp_path) -> Path:
    return tiny_onnx(tmp_path / "tiny-qdq.onnx", qdq=True)


# -- TensorRT or GPU missing: one sentence, never a traceback --------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails like a missing package


@pytest.fixture
def tensorrt_but_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_require_tensorrt_names_the_missing_package(no_tensorrt):
    with pytest.raises(CifarpressError) as exc:
        trt_engine.require_tensorrt()
    message = one_line(exc)
    assert message.startswith("TensorRT is not installed")
    assert "pip install cifarpress[tensorrt]" in message and "JetPack" in message
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # no chained import traceback


def test_require_tensorrt_names_the_missing_gpu(tensorrt_but_no_gpu):
    with pytest.raises(CifarpressError) as exc:
        trt_engine.require_tensorrt()
    assert one_line(exc).startswith("TensorRT needs an NVIDIA GPU and none is visible")


def test_require_tensorrt_names_a_broken_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    real_import = __import__

    def failing_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", failing_import)
    with pytest.raises(CifarpressError) as exc:
        trt_engine.require_tensorrt()
    assert "installed but cannot load (libnvinfer.so.10" in one_line(exc)


@pytest.mark.parametrize("missing", ["no_tensorrt", "tensorrt_but_no_gpu"])
def test_entry_points_raise_the_same_line(missing, request, float_onnx, tmp_path):
    request.getfixturevalue(missing)
    expected = "TensorRT is not installed" if missing == "no_tensorrt" else "TensorRT needs an NVIDIA GPU"
    engine = tmp_path / "tiny.engine"
    calls = [lambda: trt_engine.build_engine(float_onnx, engine),
             lambda: trt_engine.make_entropy_calibrator(np.zeros((8, 3, 32, 32), np.float32), tmp_path / "c"),
             lambda: trt_engine.TensorRTRunner(engine),
             lambda: trt_engine.bench_engine(engine)]
    for call in calls:
        with pytest.raises(CifarpressError) as exc:
            call()
        assert one_line(exc).startswith(expected)
    assert not engine.exists() and not trt_engine.sidecar_path(engine).exists()


@pytest.mark.parametrize("kwargs, needle", [
    ({"precision": "int4"}, "unknown TensorRT precision 'int4'"),
    ({"min_batch": 8, "opt_batch": 4}, "1 <= min (8) <= opt (4)"),
    ({"workspace_gb": 0}, "workspace_gb must be positive"),
])
def test_build_engine_checks_its_arguments_first(no_tensorrt, float_onnx, tmp_path, kwargs, needle):
    with pytest.raises(CifarpressError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        trt_engine.build_engine(float_onnx, tmp_path / "x.engine", **kwargs)


def test_qdq_detection_and_content_named_calibration_cache(float_onnx, qdq_onnx, tmp_path):
    assert not trt_engine.onnx_has_qdq(float_onnx)
    assert trt_engine.onnx_has_qdq(qdq_onnx)
    first = trt_engine.calibration_cache_path(float_onnx, tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.name.startswith("tiny.") and first.suffix == ".calib"
    assert trt_engine.calibration_cache_path(float_onnx, tmp_path / "cache") == first
    tiny_onnx(float_onnx, scale=2.0)  # new weights: the old cache must not be picked up
    assert trt_engine.calibration_cache_path(float_onnx, tmp_path / "cache") != first


def test_calibration_images_are_balanced_pixels(tiny_cifar_root):
    split = load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)
    images = trt_engine.calibration_images(split, count=50)
    assert images.shape == (50, 3, 32, 32) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0


# -- build_engine's own logic, against a stand-in for the TensorRT 10 Python API ----------------------
# The stand-in only records calls, using TensorRT 10's names; it checks what cifarpress asks
# of TensorRT (flags, profiles, sidecar, error text), not what TensorRT does with it.

class FakeTensorRT(types.ModuleType):
    def __init__(self, version="10.3.0", parse_errors=(), build_fails=False, has_precision_flags=True):
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls = {}
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, severity):
                pass

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.pool = [], [], {}
                self.calibration_profile = None
                if has_precision_flags:
                    self.int8_calibrator = None

            def set_memory_pool_limit(self, pool, size):
                self.pool[pool] = size

            def set_flag(self, flag):
                self.flags.append(flag)

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

            def set_calibration_profile(self, profile):
                self.calibration_profile = profile

        class Tensor:
            name, shape = INPUT_NAME, (-1, 3, 32, 32)

        class Network:
            num_inputs = 1

            def get_input(self, i):
                return Tensor()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                fake.calls["config"] = Config()
                return fake.calls["config"]

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return None if build_fails else b"PLAN"

        class ParserError:
            def __init__(self, text):
                self.text = text

            def desc(self):
                return self.text

            def node_name(self):
                return "Gemm_0"

        class OnnxParser:
            num_errors = len(parse_errors)

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls["parsed"] = path
                return not parse_errors

            def get_error(self, i):
                return ParserError(parse_errors[i])

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(**({"FP16": "FP16", "INT8": "INT8"} if has_precision_flags else {}))


@pytest.fixture
def fake_gpu(monkeypatch):
    def seen_by_cifarpress(name, fake_result):
        # Only cifarpress's own GPU checks see the fake GPU: torch.export, run under it by the CLI tests,
        # would otherwise trace for CUDA, fail, and keep that state for the rest of the session.
        real = getattr(torch.cuda, name)

        def patched(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            return fake_result if caller.startswith("cifarpress.") else real(*args, **kwargs)

        monkeypatch.setattr(torch.cuda, name, patched)

    def install(**kwargs) -> FakeTensorRT:
        fake = FakeTensorRT(**kwargs)
        # torch.export probes for a `tensorrt` module on first use and stays broken for the session if it
        # finds this fake; one use before the fake is installed settles the probe on the real environment.
        torch.export.export(torch.nn.ReLU(), (torch.zeros(1),))
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        for name, result in [("is_available", True), ("device_count", 1), ("current_device", 0),
                             ("get_device_name", "Fake GPU"), ("get_device_capability", (8, 7))]:
            seen_by_cifarpress(name, result)
        return fake

    return install


def test_fp16_build_writes_engine_and_sidecar(fake_gpu, float_onnx, tmp_path):
    fake = fake_gpu()
    engine = trt_engine.build_engine(float_onnx, tmp_path / "out" / "tiny.engine", "fp16", 1, 32, 128,
                                     workspace_gb=0.5)
    assert engine.read_bytes() == b"PLAN"
    config = fake.calls["config"]
    assert fake.calls["network_flags"] == 0  # TensorRT 10: explicit batch is the only mode
    assert config.flags == ["FP16"] and config.int8_calibrator is None
    assert config.pool == {"workspace": 1 << 29}
    assert config.profiles[0].shapes == {INPUT_NAME: ((1, 3, 32, 32), (32, 3, 32, 32), (128, 3, 32, 32))}
    sidecar = json.loads(trt_engine.sidecar_path(engine).read_text())
    assert sidecar["tensorrt"] == "10.3.0" and sidecar["gpu"] == "Fake GPU" and sidecar["precision"] == "fp16"
    assert sidecar["input"]["profile"] == {"min": [1, 3, 32, 32], "opt": [32, 3, 32, 32], "max": [128, 3, 32, 32]}
    assert sidecar["source_onnx"]["sha256"] == trt_engine.file_sha256(float_onnx)
    assert sidecar["calibration_cache"] is None and sidecar["dataset"] == "cifar10"
    assert trt_engine.read_sidecar(engine) == sidecar


def test_implicit_int8_needs_a_calibrator_and_gets_a_fixed_calibration_profile(fake_gpu, float_onnx, tmp_path):
    fake = fake_gpu()
    with pytest.raises(CifarpressError, match="needs calibration images"):
        trt_engine.build_engine(float_onnx, tmp_path / "a.engine", "int8")
    calibrator = types.SimpleNamespace(get_batch_size=lambda: 16, cache_path=tmp_path / "tiny.calib")
    engine = trt_engine.build_engine(float_onnx, tmp_path / "b.engine", "int8", calibrator=calibrator)
    config = fake.calls["config"]
    assert config.flags == ["INT8", "FP16"] and config.int8_calibrator is calibrator
    assert config.calibration_profile.shapes[INPUT_NAME] == ((16, 3, 32, 32),) * 3
    sidecar = trt_engine.read_sidecar(engine)
    assert sidecar["quantization"].startswith("implicit") and sidecar["calibration_batch"] == 16
    assert sidecar["calibration_cache"] == str((tmp_path / "tiny.calib").resolve())


def test_qdq_onnx_builds_int8_without_calibration_and_only_as_int8(fake_gpu, qdq_onnx, tmp_path):
    fake = fake_gpu()
    with pytest.raises(CifarpressError, match="holds Q/DQ nodes .* precision 'int8'"):
        trt_engine.build_engine(qdq_onnx, tmp_path / "a.engine", "fp16")
    engine = trt_engine.build_engine(qdq_onnx, tmp_path / "b.engine", "int8")
    assert fake.calls["config"].flags == ["INT8", "FP16"] and fake.calls["config"].int8_calibrator is None
    assert trt_engine.read_sidecar(engine)["quantization"] == "explicit Q/DQ"


def test_cli_int8_engine_from_a_float_model_is_explicit_from_our_calibration(fake_gpu, tiny_cifar_root, tmp_path):
    from typer.testing import CliRunner

    from cifarpress.model_file import save_model
    from cifarpress.cli import app
    from cifarpress.models import build_model
    from cifarpress.export.int8 import check_int8_rules

    fake = fake_gpu()
    save_model(tmp_path / "m.pt", build_model("resnet20").eval(), "resnet20", 10, "cifar10")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.pt"), "--format", "tensorrt", "--precision", "int8",
                                      "--calibrator", "minmax", "--calib-images", "100", "--check-images", "50",
                                      "--data-root", str(tiny_cifar_root)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    qdq = tmp_path / "m.int8.onnx"  # the checked QDQ export is what TensorRT parsed
    assert Path(fake.calls["parsed"]) == qdq and trt_engine.onnx_has_qdq(qdq) and not check_int8_rules(qdq)
    assert fake.calls["config"].int8_calibrator is None  # no implicit calibration
    sidecar = trt_engine.read_sidecar(tmp_path / "m.int8.engine")
    assert sidecar["quantization"] == "explicit Q/DQ" and sidecar["precision"] == "int8"


def test_cli_int8_engine_from_a_float_onnx_file_is_explicit_too(fake_gpu, tiny_cifar_root, tmp_path):
    from typer.testing import CliRunner

    from cifarpress.cli import app
    from cifarpress.export.onnx import export_onnx
    from cifarpress.models import build_model

    export_onnx(build_model("resnet20").eval(), tmp_path / "m.onnx", SPEC, [str(i) for i in range(10)])
    fake = fake_gpu()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.onnx"), "--format", "tensorrt", "--precision",
                                      "int8", "--calib-images", "100", "--check-images", "50",
                                      "--data-root", str(tiny_cifar_root)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert Path(fake.calls["parsed"]) == tmp_path / "m.int8.onnx" and fake.calls["config"].int8_calibrator is None
    assert trt_engine.read_sidecar(tmp_path / "m.int8.engine")["quantization"] == "explicit Q/DQ"


def test_parser_and_builder_failures_are_one_line(fake_gpu, float_onnx, tmp_path):
    fake_gpu(parse_errors=("Unsupported operator Foo", "second problem"))
    with pytest.raises(CifarpressError) as exc:
        trt_engine.build_engine(float_onnx, tmp_path / "a.engine")
    assert "cannot parse" in one_line(exc) and "Unsupported operator Foo (node Gemm_0)" in str(exc.value)
    fake_gpu(build_fails=True)
    with pytest.raises(CifarpressError) as exc:
        trt_engine.build_engine(float_onnx, tmp_path / "b.engine")
    assert "could not build a fp16 engine" in one_line(exc)
    assert not (tmp_path / "b.engine").exists()


def test_tensorrt_11_without_precision_flags_says_what_to_install(fake_gpu, float_onnx, qdq_onnx, tmp_path):
    fake = fake_gpu(version="11.0.0", has_precision_flags=False)
    with pytest.raises(CifarpressError, match=r"no FP16 builder flag .* `tensorrt>=10,<11`"):
        trt_engine.build_engine(float_onnx, tmp_path / "a.engine", "fp16")
    trt_engine.build_engine(qdq_onnx, tmp_path / "b.engine", "int8")  # strongly typed: Q/DQ alone suffices
    assert fake.calls["config"].flags == []
    trt_engine.build_engine(float_onnx, tmp_path / "c.engine", "fp32")


def _engine_recipe(folder: Path, data_root: Path, export: str) -> Path:
    from cifarpress.model_file import save_model
    from cifarpress.models import build_model

    torch.manual_seed(0)
    save_model(folder / "start.pt", build_model("resnet20", 10), "resnet20", 10, "cifar10")
    path = folder / "recipe.yaml"
    path.write_text(f"name: engine\ndata_root: {data_root}\nmodel: {{arch: resnet20, checkpoint: start.pt}}\n"
                    f"stages:\n  - export: {export}\nbench: {{batch_sizes: [1, 8], seconds: 0.1, threads: 1}}\n")
    return path


def test_recipe_tensorrt_export_without_tensorrt_fails_before_any_stage(no_tensorrt, tiny_cifar_root, tmp_path):
    from cifarpress.pipeline.compress import run_recipe
    from cifarpress.pipeline.recipe import load_recipe

    recipe = load_recipe(_engine_recipe(tmp_path, tiny_cifar_root, "{format: tensorrt, precision: fp16}"))
    with pytest.raises(CifarpressError) as exc:
        run_recipe(recipe, tmp_path / "run")
    assert "TensorRT" in one_line(exc) and not list((tmp_path / "run").glob("0*"))


def test_recipe_fp16_needs_format_tensorrt(tiny_cifar_root, tmp_path):
    from cifarpress.errors import RecipeError
    from cifarpress.pipeline.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"stages\[0\]\.export.*fp16 needs format: tensorrt"):
        load_recipe(_engine_recipe(tmp_path, tiny_cifar_root, "{precision: fp16}"))


def test_recipe_tensorrt_int8_engine_is_reported_beside_a_reference_engine(fake_gpu, tiny_cifar_root, tmp_path,
                                                                           monkeypatch):
    """Build plumbing on the fake TensorRT; GPU timings stubbed (fp16 reference 2 ms, int8 engine 1 ms)."""
    from cifarpress.pipeline import compress
    from cifarpress.pipeline.recipe import load_recipe

    fake = fake_gpu()
    parsed = []
    real_build = trt_engine.build_engine

    def build(onnx_path, engine_path, precision, **kwargs):
        parsed.append((Path(onnx_path).name, precision))
        return real_build(onnx_path, engine_path, precision, **kwargs)

    def timed(engine, batches, iters=200, test_split=None):
        ms = 1.0 if "reference" not in Path(engine).name else 2.0
        lat = {str(b): {"p50": ms * b, "p90": ms * b, "p99": ms * b} for b in batches}
        return {"model": str(engine), "engine_bytes": Path(engine).stat().st_size, "tensorrt": fake.__version__,
                "precision": trt_engine.read_sidecar(engine)["precision"], "top1": 50.0 + ms,
                "latency_ms": lat, "compute_latency_ms": lat, "gpu_memory": {}, "machine": {"gpu": "Fake GPU"}}

    monkeypatch.setattr(trt_engine, "build_engine", build)
    monkeypatch.setattr(trt_engine, "bench_engine", timed)
    recipe = load_recipe(_engine_recipe(tmp_path, tiny_cifar_root, "{format: tensorrt, precision: int8, "
                                        "calibrator: minmax, calib_images: 40, check_images: 20}"))
    run = compress.run_recipe(recipe, tmp_path / "run")
    report = json.loads((run / "report.json").read_text())
    assert parsed == [("model.onnx", "int8"), ("model.onnx", "fp16")]  # the int8 QDQ export, the baseline's
    assert [r["stage"] for r in report["stages"]] == ["baseline", "export-int8"]  # its CPU row stays
    deployable = report["deployable"]
    assert deployable["format"] == "tensorrt int8" and deployable["artifact"].endswith("01-export/model.engine")
    assert deployable["onnx"]["artifact"].endswith("01-export/model.onnx")
    trt = deployable["tensorrt"]
    assert trt["reference"]["precision"] == "fp16" and trt["reference"]["model"].endswith("00-baseline/model.pt")
    assert trt["ratios"]["latency_p50_b8"] == pytest.approx(0.5) and trt["ratios"]["top1_delta_pp"] == -1.0
    text = (run / "report.md").read_text()
    assert "| starting model | fp16 | 52.00 |" in text and "| deployable | int8 | 51.00 |" in text
    assert "| 2.000 | 2.000 | 16.000 | 16.000 |" in text and "| 8.000 (0.50×) | 8.000 |" in text


def test_engine_device_memory_across_versions():
    assert trt_engine.engine_device_memory(types.SimpleNamespace(device_memory_size_v2=123)) == 123
    assert trt_engine.engine_device_memory(types.SimpleNamespace(get_device_memory_size_v2=lambda: 45)) == 45
    assert trt_engine.engine_device_memory(types.SimpleNamespace(device_memory_size=67)) == 67


# -- real engines (TensorRT + CUDA GPU) --------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory, tiny_cifar_root):
    """The built-in trained resnet20, its ONNX export, and the tiny synthetic splits."""
    from cifarpress.model_file import load_model
    from cifarpress.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("tensorrt")
    model, _ = load_model("builtin:resnet20-cifar10")
    model.eval()
    train = load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)
    test = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)
    onnx_path = export_onnx(model, folder / "resnet20.onnx", SPEC, test.classes, {"arch": "resnet20"})
    return model, onnx_path, train, test, folder


def onnxruntime_logits(path, x: np.ndarray, exact: bool = False) -> np.ndarray:
    """exact: the graph's own math (fusions off), the reference an int8 engine is built from; the GPU host's
    CPU int8 kernels may saturate (no VNNI), which says nothing about the engine."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(mean and smallest per-image cosine similarity of the logits, top-1 agreement in %).

    Cosine, not top-1 alone: the synthetic test images leave near-tied logits that flip on tiny errors.
    """
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return float(cos.mean()), float(cos.min()), 100.0 * float((ref.argmax(1) == got.argmax(1)).mean())


@needs_gpu
def test_fp16_engine_matches_onnxruntime(gpu_setup):
    _, onnx_path, _, test, folder = gpu_setup
    engine = trt_engine.build_engine(onnx_path, folder / "fp16.engine", "fp16", 1, 32, 64)
    x = test.images.numpy().astype(np.float32) / 255.0  # 100 images: two chunks of the max batch 64
    with trt_engine.TensorRTRunner(engine) as runner:
        got = runner.infer(x)
        assert got.shape == (100, 10) and got.dtype == np.float32
        with pytest.raises(CifarpressError, match="batches of 1 to 64"):
            runner.time(65, iters=2)
        for copies in (False, True):
            timing = runner.time(8, iters=20, warmup=5, include_copies=copies)
            assert timing["include_copies"] is copies and 0 < timing["p50"] <= timing["p99"]
        memory = runner.memory()
        assert memory["torch_peak_bytes"] > 0 and memory["engine_activation_bytes"] >= 0
    _, worst, top1 = agreement(onnxruntime_logits(onnx_path, x), got)
    assert worst > 0.999 and top1 >= 98.0
    sidecar = trt_engine.read_sidecar(engine)
    assert sidecar["gpu"] == torch.cuda.get_device_name() and sidecar["builder_flags"] == ["FP16"]


@needs_gpu
def test_calibrated_int8_engine_matches_onnxruntime_and_reuses_its_cache(gpu_setup):
    _, onnx_path, train, test, folder = gpu_setup
    cache = trt_engine.calibration_cache_path(onnx_path, folder)
    images = trt_engine.calibration_images(train, count=200)
    calibrator = trt_engine.make_entropy_calibrator(images, cache, batch_size=50)
    engine = trt_engine.build_engine(onnx_path, folder / "int8.engine", "int8", 1, 32, 128, calibrator=calibrator)
    assert calibrator.batches_served == 4 and cache.is_file()
    x = test.images.numpy().astype(np.float32) / 255.0
    with trt_engine.TensorRTRunner(engine) as runner:
        mean, _, top1 = agreement(onnxruntime_logits(onnx_path, x), runner.infer(x))
    assert mean > 0.97 and top1 >= 80.0
    again = trt_engine.make_entropy_calibrator(images, cache, batch_size=50)
    trt_engine.build_engine(onnx_path, folder / "int8-cached.engine", "int8", 1, 32, 128, calibrator=again)
    assert again.batches_served == 0  # the scales came from the cache


@needs_gpu
def test_qdq_export_builds_an_explicit_int8_engine(gpu_setup):
    from cifarpress.techniques.quantize.ternary import TernaryConfig, calibrate_activations, quantize_model
    from cifarpress.export.qdq import export_qdq

    model, _, train, test, folder = gpu_setup
    quantized = copy.deepcopy(model)
    quantize_model(quantized, TernaryConfig(act_bits=8))
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    calibrate_activations(quantized, (train.images.float() / 255.0 - mean) / std)
    qdq_path = export_qdq(quantized.eval(), folder / "qdq.onnx", SPEC, test.classes)
    engine = trt_engine.build_engine(qdq_path, folder / "qdq.engine", "int8", 1, 32, 64)
    x = test.images.numpy().astype(np.float32) / 255.0
    with trt_engine.TensorRTRunner(engine) as runner:
        mean, _, _ = agreement(onnxruntime_logits(qdq_path, x, exact=True), runner.infer(x))
    assert mean > 0.97  # same int8 scales on both sides; untrained ternary weights make top-1 meaningless
    assert trt_engine.read_sidecar(engine)["quantization"] == "explicit Q/DQ"


@needs_gpu
def test_bench_engine_reports_both_latencies_and_accuracy(gpu_setup):
    _, onnx_path, _, test, folder = gpu_setup
    engine = trt_engine.build_engine(onnx_path, folder / "bench.engine", "fp16", 1, 8, 16)
    result = trt_engine.bench_engine(engine, batch_sizes=(1, 16), iters=10, test_split=test)
    assert set(result["latency_ms"]) == set(result["compute_latency_ms"]) == {"1", "16"}
    assert result["precision"] == "fp16" and 0.0 <= result["top1"] <= 100.0
    assert result["machine"]["gpu"] == torch.cuda.get_device_name()


# -- tegrastats: parser ----------------------------------------------------------------------

def fixture_lines(name: str) -> list[str]:
    """The sample lines of a fixture (its header is comment lines starting with '#')."""
    text = (FIXTURES / name).read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.txt"))


def test_there_is_a_fixture_per_jetpack_generation():
    assert {"jetpack4_nano.txt", "jetpack4_xavier_nx.txt", "jetpack5_agx_orin.txt",
            "jetpack6_orin_nano.txt"} <= set(FIXTURE_NAMES)
    for name in FIXTURE_NAMES:  # each header says where its format comes from
        header = [line for line in (FIXTURES / name).read_text().splitlines() if line.startswith("#")]
        assert any(line.startswith("# Format:") for line in header), name


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_fixture_line_parses_completely(name):
    for line in fixture_lines(name):
        sample = parse_line(line)
        assert sample is not None, line
        assert 0 < sample.ram_used_mb < sample.ram_total_mb
        assert sample.swap_total_mb and sample.swap_used_mb is not None
        assert sample.cpus and all(c.load_percent is not None for c in sample.cpus if c.active)
        assert sample.gpu_load_percent is not None and sample.emc_load_percent is not None
        assert sample.temperatures_c and all(-40 < t < 120 for t in sample.temperatures_c.values())
        assert len(sample.rails) >= 3 and sample.total_power_mw > 0
        json.dumps(sample.to_dict())  # plain data, ready for the bench JSON


def test_jetpack4_nano():
    idle, busy, five_watt = (parse_line(line) for line in fixture_lines("jetpack4_nano.txt"))
    assert (idle.ram_used_mb, idle.ram_total_mb, idle.swap_total_mb, idle.swap_cached_mb) == (2338, 3964, 1982, 0)
    assert idle.timestamp is None
    assert [(c.load_percent, c.freq_mhz) for c in idle.cpus] == [(21, 1479), (9, 1479), (11, 1479), (7, 1479)]
    assert (busy.gpu_load_percent, busy.gpu_freq_mhz, busy.emc_load_percent, busy.emc_freq_mhz) == (76, [921], 21, 1600)
    assert [c.active for c in five_watt.cpus] == [True, True, False, False]
    assert five_watt.cpus[2].load_percent is None and five_watt.cpu_load_mean == 27.5
    assert idle.temperatures_c["CPU"] == 32.5 and idle.temperatures_c["thermal"] == 31.25
    assert (busy.rails["POM_5V_GPU"].current_mw, busy.rails["POM_5V_GPU"].average_mw) == (2105, 1052)
    assert (busy.total_power_mw, busy.total_power_source) == (5821, "POM_5V_IN")


def test_jetpack4_xavier_nx_and_agx_xavier():
    idle, busy = (parse_line(line) for line in fixture_lines("jetpack4_xavier_nx.txt"))
    assert sum(not c.active for c in idle.cpus) == 2 and busy.cpus[0].freq_mhz == 1420
    assert (busy.gpu_load_percent, busy.gpu_freq_mhz) == (87, [1109])
    assert (busy.total_power_mw, busy.total_power_source) == (8943, "VDD_IN")
    assert busy.rails["VDD_CPU_GPU_CV"].current_mw == 4015
    agx = parse_line(fixture_lines("jetpack4_agx_xavier.txt")[1])
    assert (agx.gpu_load_percent, agx.gpu_freq_mhz, agx.emc_load_percent, agx.emc_freq_mhz) == (95, [], 31, None)
    assert set(agx.rails) == {"GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"}  # not confused with GPU@36.5C
    assert agx.temperatures_c["GPU"] == 36.5
    assert agx.total_power_mw == 9124 + 1544 + 3245 + 0 + 1391 + 4217
    assert agx.total_power_source.startswith("sum of ")


def test_jetpack5_agx_orin():
    idle, busy = (parse_line(line) for line in fixture_lines("jetpack5_agx_orin.txt"))
    assert idle.timestamp == "2023-08-10T10:43:40" and busy.timestamp == "2023-08-10T10:43:41"
    assert len(busy.cpus) == 12 and [c.active for c in busy.cpus].count(False) == 4
    assert (idle.gpu_load_percent, idle.gpu_freq_mhz) == (0, [0, 0])
    assert (busy.gpu_load_percent, busy.gpu_freq_mhz, busy.emc_freq_mhz) == (93, [611, 611], 3199)
    assert "CV0" not in idle.temperatures_c and "GPU" not in idle.temperatures_c  # -256C: sensor off
    assert busy.temperatures_c["GPU"] == 47.281 and busy.temperatures_c["tj"] == 48.5
    assert (busy.rails["VDD_GPU_SOC"].current_mw, busy.rails["VDD_GPU_SOC"].average_mw) == (9621, 6208)
    assert busy.total_power_mw == 9621 + 1597 + 4120  # no input rail: GPU_SOC + CPU_CV + SYS_5V0
    assert busy.total_power_source == "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0"


def test_jetpack6_orin_nano():
    idle, busy, seven_watt = (parse_line(line) for line in fixture_lines("jetpack6_orin_nano.txt"))
    assert (idle.gpu_load_percent, idle.gpu_freq_mhz) == (0, [])  # `GR3D_FREQ 0%`: no clock printed
    assert (busy.gpu_load_percent, busy.gpu_freq_mhz) == (97, [624])
    assert set(busy.temperatures_c) == {"cpu", "soc0", "soc1", "soc2", "gpu", "tj"}
    assert [c.active for c in seven_watt.cpus] == [True] * 4 + [False] * 2
    assert (seven_watt.rails["VDD_IN"].current_mw, seven_watt.rails["VDD_IN"].average_mw) == (6510, 7034)
    assert (busy.total_power_mw, busy.total_power_source) == (9380, "VDD_IN")


def test_other_layouts_seen_in_the_wild():
    # newer releases add a running max to rails and temperatures; old L4T puts one CPU clock after the list
    newer = parse_line("RAM 20642/62817MB (lfb 1x2MB) CPU [23%@2201,off] GR3D_FREQ 12%@[1300,1300] "
                       "cpu@52.968C/53.5C gpu@47.625C/47.625C VDD_GPU_SOC 5139mW/5100mW/6000mW "
                       "VDD_CPU_CV 3268mW/3268mW/3268mW VIN_SYS_5V0 5500mW/5500mW/5500mW")
    assert newer.temperatures_c == {"cpu": 52.968, "gpu": 47.625}
    assert (newer.rails["VDD_GPU_SOC"].current_mw, newer.rails["VDD_GPU_SOC"].average_mw) == (5139, 5100)
    assert newer.total_power_mw == 5139 + 3268 + 5500
    old = parse_line("RAM 220/38955MB (lfb 847x4MB) CPU [1%,5%,0%,0%]@102 EMC_FREQ 3%@1600")
    assert [(c.load_percent, c.freq_mhz) for c in old.cpus] == [(1, 102), (5, 102), (0, 102), (0, 102)]
    assert old.rails == {} and old.total_power_mw is None and old.gpu_load_percent is None


def test_malformed_lines_are_skipped_never_raised():
    """Documented choice: a line with no RAM field is not a sample (None); a garbled field is left as None."""
    for junk in ("", "tegrastats: cannot open /sys/kernel/debug", "RAM", "RAM abc/defMB CPU [1%@2]",
                 "# comment", "\x00\xff garbage"):
        assert parse_line(junk) is None
    cut = parse_line("RAM 2338/3964MB (lfb 1x2MB) SWAP 0/19")  # killed mid-line
    assert cut.ram_used_mb == 2338 and cut.swap_total_mb is None and cut.cpus == [] and cut.total_power_mw is None
    odd = parse_line("RAM 1/2MB CPU [12%@1479,???,off] GR3D_FREQ x%@y POM_5V_IN 12/ab")
    assert [(c.active, c.load_percent) for c in odd.cpus] == [(True, 12), (True, None), (False, None)]
    assert odd.gpu_load_percent is None and odd.rails == {}
    rng = random.Random(0)
    alphabet = string.printable + "%@[]/"
    for _ in range(300):
        line = "RAM 5/9MB " + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        assert parse_line(line).ram_total_mb == 9
    samples, skipped = parse_lines(["junk", "", *fixture_lines("jetpack4_nano.txt"), "more junk"])
    assert (len(samples), skipped) == (3, 2)


def test_summary_over_a_fixture():
    samples, _ = parse_lines(fixture_lines("jetpack6_orin_nano.txt"))
    summary = summarize(samples)
    assert summary["samples"] == 3 and summary["ram_total_mb"] == 7620
    assert summary["ram_used_mb"]["max"] == 2301 and summary["gpu_load_percent"]["max"] == 98
    assert summary["total_power_mw"]["mean"] == pytest.approx((4825 + 9380 + 6510) / 3)
    assert summary["total_power_source"] == "VDD_IN" and summary["max_temperature_c"]["tj"] == 51.25
    assert summarize([])["total_power_mw"] is None


# -- tegrastats: sampler with a stand-in `tegrastats` on PATH ----------------------------------

def fake_tegrastats(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "tegrastats"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return folder


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_sampler_runs_tegrastats_and_summarizes(tmp_path, monkeypatch):
    lines = fixture_lines("jetpack5_agx_orin.txt")
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    args = tmp_path / "args.txt"
    folder = fake_tegrastats(tmp_path / "bin", f'echo "$@" > "{args}"\n'
                                               f'while true; do cat "{tmp_path / "lines.txt"}"; sleep 0.05; done\n')
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    with TegraStatsSampler(interval_ms=50) as stats:
        wait_for(lambda: len(stats.samples) >= 2 * len(lines))
    assert args.read_text().split() == ["--interval", "50"]
    assert stats._proc.poll() is not None  # stopped with the block
    summary = stats.summary()
    assert summary["samples"] >= 2 * len(lines) and summary["skipped_lines"] == 0
    assert summary["interval_ms"] == 50 and summary["ram_total_mb"] == 30536
    assert summary["gpu_load_percent"]["max"] == 93 and summary["total_power_mw"]["max"] == 15338
    assert summary["total_power_source"] == "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0"


def test_sampler_without_tegrastats_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CifarpressError) as exc, TegraStatsSampler():
        pass
    assert one_line(exc) == "--device jetson needs NVIDIA's tegrastats on PATH; run it on a Jetson with JetPack"


def test_sampler_reports_a_tegrastats_that_fails(tmp_path, monkeypatch):
    folder = fake_tegrastats(tmp_path / "bin", 'echo "tegrastats: permission denied" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(CifarpressError) as exc, TegraStatsSampler() as stats:
        wait_for(lambda: stats._proc.poll() is not None)
    assert "exited with status 1 (tegrastats: permission denied)" in one_line(exc)


# -- CLI: TensorRT and device choices without a GPU are one line each -------------------

def _cli(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cifarpress.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


@pytest.mark.skipif(HAS_TENSORRT and torch.cuda.is_available(), reason="this machine can build engines")
def test_cli_export_tensorrt_without_it_is_one_sentence(tmp_path):
    from cifarpress.model_file import save_model
    from cifarpress.models import build_model

    save_model(tmp_path / "m.pt", build_model("resnet20"), "resnet20", 10, "cifar10")
    line = _one_error_line(_cli("export", str(tmp_path / "m.pt"), "--format", "tensorrt"))
    assert "TensorRT" in line
    assert not (tmp_path / "m.onnx").exists()  # it failed before doing any work


def test_cli_bench_device_mismatches_are_one_line(tmp_path):
    assert "TensorRT engine" in _one_error_line(_cli("bench", str(tmp_path / "m.onnx"), "--device", "gpu"))
    assert "unknown --device" in _one_error_line(_cli("bench", str(tmp_path / "m.onnx"), "--device", "tpu"))
    assert "--device gpu" in _one_error_line(_cli("bench", str(tmp_path / "m.engine")))


def test_cli_exports_a_quantized_model_as_qdq(tmp_path, tiny_cifar_root):
    import onnx

    from cifarpress.model_file import save_model
    from cifarpress.models import build_model
    from cifarpress.techniques.quantize.ternary import quantize_model

    model = build_model("resnet20")
    quantize_model(model)
    save_model(tmp_path / "q.pt", model, "resnet20", 10, "cifar10")
    proc = _cli("export", str(tmp_path / "q.pt"), "--data-root", str(tiny_cifar_root))
    assert proc.returncode == 0, proc.stderr
    ops = {node.op_type for node in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "DequantizeLinear" in ops


def test_cli_export_of_an_onnx_file_needs_format_tensorrt(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    assert "--format tensorrt" in _one_error_line(_cli("export", str(tmp_path / "m.onnx")))
    if not (HAS_TENSORRT and torch.cuda.is_available()):
        line = _one_error_line(_cli("export", str(tmp_path / "m.onnx"), "--format", "tensorrt", "--precision", "int8"))
        assert "TensorRT" in line


@needs_gpu
def test_recipe_tensorrt_fp16_engine_on_a_gpu(tiny_cifar_root, tmp_path):
    from cifarpress.pipeline.compress import run_recipe
    from cifarpress.pipeline.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: gpu\ndata_root: {tiny_cifar_root}\n"
                    "model: {arch: resnet20, checkpoint: builtin:resnet20-cifar10}\n"
                    "stages:\n  - export: {format: tensorrt, precision: fp16, check_images: 50}\n"
                    "bench: {batch_sizes: [1, 8], seconds: 0.2, threads: 1}\n")
    report = json.loads((run_recipe(load_recipe(path), tmp_path / "run") / "report.json").read_text())
    trt = report["deployable"]["tensorrt"]
    assert report["deployable"]["format"] == "tensorrt fp16" and trt["gpu"] == torch.cuda.get_device_name()
    # The engine and its reference are the same model at the same precision: equal top-1 up to kernel choice.
    assert trt["reference"]["precision"] == "fp16" and abs(trt["ratios"]["top1_delta_pp"]) < 2.0
    assert 0 < trt["latency_ms"]["8"]["p50"] <= trt["latency_ms"]["8"]["p99"]
