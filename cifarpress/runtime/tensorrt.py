"""TensorRT engines from cifarpress ONNX exports: build (FP32/FP16/INT8), run and time them on an NVIDIA GPU.

Written against the TensorRT 10 Python API. TensorRT is optional and GPU-only,
so nothing here imports it at module level: every entry point calls
`require_tensorrt()`, which turns a missing install or a missing GPU into one
CifarpressError sentence instead of an import traceback.

Device memory is held in torch CUDA tensors (TensorRT only needs their
addresses), so no pycuda/cuda-python dependency is needed beyond torch.

An engine only runs on the TensorRT version and GPU model that built it; the
JSON sidecar written next to it (`model.engine.json`) records both, so a
mismatch is reported in words rather than as a deserialization failure.

INT8 comes in two forms:
  * explicit: the ONNX holds QuantizeLinear/DequantizeLinear nodes (a ternary
    model's export_qdq, or our post-training calibration, quantize.int8); their
    scales are used as they are and no calibration runs. The command line always
    builds int8 this way, quantizing a float model or ONNX file first.
  * implicit: a float ONNX plus calibration images, fed through an
    IInt8EntropyCalibrator2 (deprecated since TensorRT 10.1, removed in 11);
    kept in the Python API (build_engine(calibrator=make_entropy_calibrator(...))).
Either way FP16 is enabled too, so layers left unquantized run in FP16, not FP32.
TensorRT 11 removed the precision builder flags; with it only FP32 and explicit
(Q/DQ) INT8 build, and FP16 or implicit INT8 raise a CifarpressError.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time as _time
from pathlib import Path

import numpy as np
import onnx
import torch

from cifarpress.version import __version__
from cifarpress.data import CifarSplit, balanced_subset
from cifarpress.errors import CifarpressError
from cifarpress.runtime.inputs import labelled_batches, normalization_of
from cifarpress.runtime.onnx_file import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata
from cifarpress.utils.io import atomic_write, atomic_write_json

PRECISIONS = ("fp32", "fp16", "int8")
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


# -- availability --------------------------------------------------------------------

def require_tensorrt():
    """The `tensorrt` module, or a one-sentence CifarpressError naming what is missing."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("tensorrt"):  # tensorrt is there; one of its imports is not
            raise CifarpressError(f"TensorRT is installed but cannot load ({str(exc).splitlines()[0][:160]}); "
                                  f"reinstall it with `pip install cifarpress[tensorrt]`") from None
        raise CifarpressError(
            "TensorRT is not installed; on an NVIDIA GPU machine run `pip install cifarpress[tensorrt]` "
            "(or use JetPack's TensorRT on a Jetson)") from None
    except (ImportError, OSError) as exc:  # present but its CUDA libraries (libnvinfer, libcudart) are not
        raise CifarpressError(f"TensorRT is installed but cannot load ({str(exc).splitlines()[0][:160]}); "
                              f"check that its CUDA libraries match the installed driver") from None
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise CifarpressError(
            "TensorRT needs an NVIDIA GPU and none is visible (torch.cuda.is_available() is False); run on a "
            "machine with an NVIDIA GPU and a CUDA build of torch (on a Jetson, NVIDIA's JetPack torch wheel)")
    return trt


def _trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


# -- ONNX inspection -------------------------------------------------------------------

def onnx_has_qdq(onnx_path: str | Path) -> bool:
    """True when the graph carries explicit quantization (Q/DQ nodes), as export_qdq writes."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type in QDQ_OPS for node in proto.graph.node)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def calibration_cache_path(onnx_path: str | Path, folder: str | Path | None = None) -> Path:
    """A cache file named after the ONNX content: a cache made for other weights is never reused by mistake."""
    onnx_path = Path(onnx_path)
    folder = Path(folder) if folder is not None else onnx_path.parent
    return folder / f"{onnx_path.stem}.{file_sha256(onnx_path)[:12]}.calib"


def calibration_images(split: CifarSplit, count: int = 1000, seed: int = 0) -> np.ndarray:
    """A class-balanced float32 NCHW batch in [0, 1] (the exported model's input) for INT8 calibration."""
    count = min(count, len(split))
    idx = balanced_subset(split.labels, count, seed=seed) if count >= split.spec.num_classes else torch.arange(count)
    return split.pixels(idx).numpy()


# -- INT8 calibration ----------------------------------------------------------------------

@functools.cache
def _entropy_calibrator_class():
    trt = require_tensorrt()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds fixed batches of images to TensorRT's entropy calibration; caches the resulting scales.

        A trailing partial batch is dropped: TensorRT calibrates with one fixed batch shape.
        """

        def __init__(self, images: np.ndarray, cache_path: str | Path, batch_size: int = 64):
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 base: must be initialised explicitly
            images = np.asarray(images)
            if images.dtype == np.uint8:
                images = images.astype(np.float32) / 255.0
            if images.ndim != 4 or images.shape[1] != 3:
                raise CifarpressError(f"calibration images must be NCHW with 3 channels, not shape {images.shape}")
            if len(images) < batch_size:
                raise CifarpressError(f"INT8 calibration needs at least one batch of {batch_size} images; "
                                      f"got {len(images)}")
            # underscored: keep clear of attribute names on the pybind11 base class
            self._images = np.ascontiguousarray(images, dtype=np.float32)
            self._batch_size = int(batch_size)
            self._next = 0
            self._device = torch.empty((self._batch_size, *self._images.shape[1:]), dtype=torch.float32,
                                       device="cuda")
            self.cache_path = Path(cache_path)
            self.batches_served = 0

        def get_batch_size(self) -> int:
            return self._batch_size

        def get_batch(self, names):
            if self._next + self._batch_size > len(self._images):
                return None  # tells TensorRT calibration data is exhausted
            batch = torch.from_numpy(self._images[self._next:self._next + self._batch_size])
            self._device.copy_(batch)
            torch.cuda.synchronize()  # TensorRT reads the buffer on its own stream
            self._next += self._batch_size
            self.batches_served += 1
            return [int(self._device.data_ptr())] * len(names)

        def read_calibration_cache(self):
            if self.cache_path.is_file():
                return self.cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache) -> None:
            atomic_write(self.cache_path, lambda tmp: Path(tmp).write_bytes(bytes(cache)))

    return EntropyCalibrator


def make_entropy_calibrator(images: np.ndarray, cache_path: str | Path, batch_size: int = 64):
    """An IInt8EntropyCalibrator2 over `images` (float32 NCHW in [0, 1]) that caches its scales at `cache_path`.

    When `cache_path` exists TensorRT reads the scales from it and no image is
    fed: name it with calibration_cache_path so it follows the ONNX content.
    """
    return _entropy_calibrator_class()(images, cache_path, batch_size)


# -- build -------------------------------------------------------------------------------

def _dims(dims) -> tuple[int, ...]:
    # trt.Dims indexes by position only (no slices or negative indices)
    return tuple(int(dims[i]) for i in range(len(dims)))


def _network_flags(trt) -> int:
    # TensorRT < 10 needs EXPLICIT_BATCH for ONNX; 10 makes it the only mode and deprecates the flag.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    return 1 << int(flag) if flag is not None and _trt_major(trt) < 10 else 0


def _parse_onnx(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = error.node_name() if hasattr(error, "node_name") else error.node()
        errors.append(f"{error.desc()} (node {node})" if node not in ("", -1) else error.desc())
    detail = "; ".join(errors[:3]) or "no detail given"
    raise CifarpressError(f"TensorRT cannot parse {onnx_path}: {detail}")


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16",
                 min_batch: int = 1, opt_batch: int = 64, max_batch: int = 256,
                 calibrator=None, workspace_gb: float = 2) -> Path:
    """Build a serialized TensorRT engine from a cifarpress ONNX export; writes it and `<engine>.json` atomically.

    precision: "fp32", "fp16" or "int8". INT8 uses the Q/DQ scales of an
    export_qdq file, or else needs `calibrator` (make_entropy_calibrator).
    The batch dimension is dynamic in [min_batch, max_batch], tuned for opt_batch.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise CifarpressError(f"unknown TensorRT precision '{precision}'; use one of: {', '.join(PRECISIONS)}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise CifarpressError(f"batch sizes must satisfy 1 <= min ({min_batch}) <= opt ({opt_batch}) "
                              f"<= max ({max_batch})")
    if workspace_gb <= 0:
        raise CifarpressError(f"workspace_gb must be positive, not {workspace_gb}")
    trt = require_tensorrt()
    meta = read_onnx_metadata(onnx_path)  # also: a clear error when the file is missing or not ONNX
    qdq = onnx_has_qdq(onnx_path)
    if qdq and precision != "int8":
        raise CifarpressError(f"{onnx_path} holds Q/DQ nodes (a quantized export); build it with precision 'int8'")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    _parse_onnx(trt, network, logger, onnx_path)
    if network.num_inputs != 1 or network.get_input(0).name != INPUT_NAME:
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        raise CifarpressError(f"{onnx_path} has inputs {names}; a cifarpress export has one named '{INPUT_NAME}'")
    chw = _dims(network.get_input(0).shape)[1:]
    if any(d < 0 for d in chw):
        raise CifarpressError(f"{onnx_path} has a dynamic image size {chw}; only the batch may be dynamic")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    shapes = {"min": (min_batch, *chw), "opt": (opt_batch, *chw), "max": (max_batch, *chw)}
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    flags = []
    calibration_batch = None
    if precision == "fp16":
        flags = _enable(trt, config, "FP16")
    elif precision == "int8" and qdq:
        # explicit quantization: Q/DQ scales are used as written; FP16 for the layers outside them.
        # TensorRT 11 builds strongly typed networks, where the Q/DQ nodes alone set the types.
        if _trt_major(trt) < 11:
            flags = _enable(trt, config, "INT8", "FP16")
    elif precision == "int8":
        if calibrator is None:
            raise CifarpressError("INT8 from a float ONNX needs calibration images; pass a calibrator "
                                  "(make_entropy_calibrator) or build from a Q/DQ export (export_qdq)")
        flags = _enable(trt, config, "INT8", "FP16")
        if not hasattr(config, "int8_calibrator"):
            raise CifarpressError(f"TensorRT {trt.__version__} has no INT8 calibration (removed in TensorRT 11); "
                                  f"install `tensorrt>=10,<11`, or build from a Q/DQ export (export_qdq)")
        config.int8_calibrator = calibrator
        # the batch is dynamic, so calibration needs its own profile fixed at the calibrator's batch
        calibration_batch = int(calibrator.get_batch_size())
        calibration = builder.create_optimization_profile()
        fixed = (calibration_batch, *chw)
        calibration.set_shape(INPUT_NAME, fixed, fixed, fixed)
        config.set_calibration_profile(calibration)

    started = _time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = _time.perf_counter() - started
    if serialized is None:
        raise CifarpressError(f"TensorRT could not build a {precision} engine from {onnx_path}; its log above "
                              f"names the layer (try a larger workspace_gb or another precision)")

    def write_engine(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(serialized)

    atomic_write(engine_path, write_engine)
    device = torch.cuda.current_device()
    cache_path = getattr(calibrator, "cache_path", None) if precision == "int8" and not qdq else None
    sidecar = {
        "format": "cifarpress-tensorrt/1",
        "producer": f"cifarpress {__version__}",
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(device),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "cuda": torch.version.cuda,
        "precision": precision,
        "quantization": ("explicit Q/DQ" if qdq else "implicit, entropy calibration") if precision == "int8" else None,
        "builder_flags": flags,
        "input": {"name": INPUT_NAME, "dtype": "float32",
                  "layout": "NCHW, " + ("pixels in [0, 1]" if normalization_of(meta) else "the model's own inputs"),
                  "profile": {k: list(v) for k, v in shapes.items()}},
        "preprocessing": meta.get("preprocessing"),
        "output": {"name": OUTPUT_NAME},
        "source_onnx": {"path": str(onnx_path.resolve()), "sha256": file_sha256(onnx_path),
                        "bytes": onnx_path.stat().st_size},
        "dataset": meta.get("dataset"),
        "classes": meta.get("classes"),
        "calibration_cache": str(Path(cache_path).resolve()) if cache_path else None,
        "calibration_batch": calibration_batch,
        "workspace_gb": workspace_gb,
        "engine_bytes": engine_path.stat().st_size,
        "build_seconds": round(build_seconds, 2),
    }
    atomic_write_json(sidecar_path(engine_path), sidecar)
    return engine_path


def _enable(trt, config, *names: str) -> list[str]:
    for name in names:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise CifarpressError(
                f"TensorRT {trt.__version__} has no {name} builder flag (removed in TensorRT 11); install "
                f"`tensorrt>=10,<11`, or build fp32 or from a Q/DQ export")
        config.set_flag(flag)
    return list(names)


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: str | Path) -> dict:
    path = sidecar_path(engine_path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- run and time ------------------------------------------------------------------------

def engine_device_memory(engine) -> int:
    """Activation memory one execution context needs, across TensorRT 10.0 (v1 only) to 11 (v2 only)."""
    for name in ("device_memory_size_v2", "get_device_memory_size_v2", "device_memory_size"):
        value = getattr(engine, name, None)
        if value is not None:
            return int(value() if callable(value) else value)
    return 0


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8}
    if dtype not in table:
        raise CifarpressError(f"the engine uses I/O type {dtype}, which cifarpress does not bind")
    return table[dtype]


def _percentiles(times_ms: list[float], batch: int) -> dict:
    t = np.asarray(times_ms)
    return {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
            "p99": float(np.percentile(t, 99)), "mean": float(t.mean()), "iters": len(t),
            "throughput_ips": float(batch * 1e3 / t.mean())}


class TensorRTRunner:
    """Runs a serialized engine on the current CUDA device with torch-owned I/O buffers on one stream.

    The buffers are sized for the profile's largest batch and bound once; a
    smaller batch uses their leading rows, so no call allocates device memory.
    """

    def __init__(self, engine_path: str | Path):
        trt = require_tensorrt()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise CifarpressError(f"TensorRT engine {self.path} not found; build one with "
                                  f"`cifarpress export --format tensorrt`")
        self.meta = read_sidecar(self.path)
        self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            built = (f"it was built by TensorRT {self.meta['tensorrt']} on {self.meta.get('gpu')}"
                     if "tensorrt" in self.meta else "it may come from another TensorRT version or GPU")
            raise CifarpressError(
                f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(self.device)} cannot load {self.path}: "
                f"{built}, and an engine only runs where it was built; rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CifarpressError(f"no GPU memory left for an execution context of {self.path}")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if not {INPUT_NAME, OUTPUT_NAME} <= names:
            raise CifarpressError(f"{self.path} has tensors {sorted(names)}, not a cifarpress "
                                  f"'{INPUT_NAME}' -> '{OUTPUT_NAME}' engine")
        low, _, high = (_dims(d) for d in self.engine.get_tensor_profile_shape(INPUT_NAME, 0))
        self.min_batch, self.max_batch = low[0], high[0]
        self.image_shape = high[1:]
        self.num_classes = _dims(self.engine.get_tensor_shape(OUTPUT_NAME))[-1]
        self.stream = torch.cuda.Stream(device=self.device)
        self._input = torch.empty((self.max_batch, *self.image_shape), device=self.device,
                                  dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(INPUT_NAME)))
        self._output = torch.empty((self.max_batch, self.num_classes), device=self.device,
                                   dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(OUTPUT_NAME)))
        self.context.set_tensor_address(INPUT_NAME, int(self._input.data_ptr()))
        self.context.set_tensor_address(OUTPUT_NAME, int(self._output.data_ptr()))
        self._bound_batch = None

    def _check_batch(self, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:
            raise CifarpressError(f"{self.path} accepts batches of {self.min_batch} to {self.max_batch} images, "
                                  f"not {batch}; rebuild it with another min/max batch")

    def _enqueue(self, batch: int) -> None:
        """Queue one inference of the first `batch` rows on self.stream (no synchronization)."""
        if batch != self._bound_batch:
            if not self.context.set_input_shape(INPUT_NAME, (batch, *self.image_shape)):
                raise CifarpressError(f"{self.path} rejected input shape {(batch, *self.image_shape)}")
            self._bound_batch = batch
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CifarpressError(f"TensorRT failed to run {self.path} on a batch of {batch}; see its log above")

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32, N x classes) for float32 NCHW pixels in [0, 1]; any N, split at the engine's max batch."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise CifarpressError(f"input must be N x {' x '.join(map(str, self.image_shape))}, not {x.shape}")
        logits = []
        with torch.cuda.stream(self.stream):
            for start in range(0, len(x), self.max_batch):
                chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + self.max_batch], dtype=np.float32))
                n = len(chunk)
                self._check_batch(n)
                self._input[:n].copy_(chunk)
                self._enqueue(n)
                self.stream.synchronize()
                logits.append(self._output[:n].float().cpu().numpy())
        return np.concatenate(logits) if logits else np.zeros((0, self.num_classes), np.float32)

    def time(self, batch: int, iters: int = 200, include_copies: bool = False, warmup: int = 20) -> dict:
        """Latency percentiles (ms) of one batch, from CUDA events around the enqueue.

        include_copies=False: the input already sits on the GPU; only the engine is
        timed. True: the pinned host-to-device input copy and the device-to-host
        logits copy are inside the timed span, as a deployed caller pays them.
        """
        self._check_batch(batch)
        host_in = torch.rand((batch, *self.image_shape)).to(self._input.dtype).pin_memory()
        host_out = torch.empty((batch, self.num_classes), dtype=self._output.dtype).pin_memory()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        with torch.cuda.stream(self.stream):
            self._input[:batch].copy_(host_in)
            for i in range(warmup + iters):
                start.record(self.stream)
                if include_copies:
                    self._input[:batch].copy_(host_in, non_blocking=True)
                self._enqueue(batch)
                if include_copies:
                    host_out.copy_(self._output[:batch], non_blocking=True)
                end.record(self.stream)
                end.synchronize()  # one batch at a time: latency, not pipelined throughput
                if i >= warmup:
                    times.append(start.elapsed_time(end))
        return _percentiles(times, batch) | {"include_copies": include_copies}

    def memory(self) -> dict:
        """GPU memory: torch-held I/O buffers (peak), the context's activations, and the engine's weights."""
        torch_peak = int(torch.cuda.max_memory_allocated(self.device))
        activations = engine_device_memory(self.engine)
        weights = self.path.stat().st_size  # the plan is mostly weights, which stay resident on the GPU
        return {"torch_peak_bytes": torch_peak, "engine_activation_bytes": activations,
                "engine_bytes": weights, "estimate_bytes": torch_peak + activations + weights}

    def close(self) -> None:
        # context before engine before runtime: TensorRT's destruction order
        for name in ("context", "engine", "_runtime"):
            if hasattr(self, name):
                delattr(self, name)

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def engine_accuracy(runner: TensorRTRunner, split) -> float:
    """Top-1 (%) of an engine on a CIFAR split, or on a user's (images, labels) batches of the model's inputs
    (mapped through the preprocessing the engine's ONNX declared, recorded in its sidecar)."""
    correct = total = 0
    for x, labels in labelled_batches(split, runner.meta, batch=runner.max_batch):
        correct += int((runner.infer(x).argmax(1) == labels).sum())
        total += len(labels)
    if total == 0:
        raise CifarpressError("the evaluation data yields no batches; give it at least one (images, labels) batch")
    return 100.0 * correct / total


def bench_engine(engine_path: str | Path, batch_sizes=(1, 64), iters: int = 200,
                 test_split: CifarSplit | None = None) -> dict:
    """Latency with and without host copies per batch size, GPU memory and, given a split, top-1."""
    from cifarpress.runtime.latency import machine_description

    trt = require_tensorrt()
    with TensorRTRunner(engine_path) as runner:
        result = {"model": str(engine_path), "format": "tensorrt", "tensorrt": trt.__version__,
                  "precision": runner.meta.get("precision"), "engine_bytes": runner.path.stat().st_size,
                  "dataset": runner.meta.get("dataset")}
        result["latency_ms"] = {str(b): runner.time(b, iters, include_copies=True) for b in batch_sizes}
        result["compute_latency_ms"] = {str(b): runner.time(b, iters, include_copies=False) for b in batch_sizes}
        result["gpu_memory"] = runner.memory()
        if test_split is not None:
            result["top1"] = engine_accuracy(runner, test_split)
    result["machine"] = machine_description() | {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return result
