"""`cifarpress bench` on any target: an ONNX file in onnxruntime on this CPU, or a TensorRT engine on an
NVIDIA GPU or a Jetson (with tegrastats power and memory beside it)."""
from __future__ import annotations

from pathlib import Path

from cifarpress.data import load_split
from cifarpress.errors import CifarpressError

DEVICES = ("cpu", "gpu", "jetson")


def bench_file(model: Path, device: str, batch: tuple[int, ...], threads: int | None, seconds: float, iters: int,
               accuracy: bool, data_root=None):
    """Returns (result, a rich table to print or None for a JSON-only result)."""
    if any(b < 1 for b in batch):
        raise CifarpressError("batch sizes must be >= 1")
    if device not in DEVICES:
        raise CifarpressError(f"unknown --device '{device}'; use cpu, gpu or jetson")
    is_engine = model.suffix in (".engine", ".plan")
    if device == "cpu" and is_engine:
        raise CifarpressError(f"{model} is a TensorRT engine; bench it with --device gpu or --device jetson")
    if device != "cpu" and not is_engine:
        raise CifarpressError(f"--device {device} benches a TensorRT engine; build one with "
                              f"`cifarpress export MODEL.pt --format tensorrt` and pass the .engine file")
    if not is_engine:
        from cifarpress.runtime.latency import bench_onnx
        from cifarpress.runtime.onnx_file import read_onnx_metadata
        from cifarpress.runtime.tables import bench_table

        meta = read_onnx_metadata(model)
        test = load_split(meta.get("dataset", "cifar10"), "test", data_root) if accuracy else None
        result = bench_onnx(model, batch, threads, test, seconds)
        return result, bench_table(result)
    from cifarpress.runtime.tensorrt import bench_engine, read_sidecar, require_tensorrt

    require_tensorrt()
    if not model.is_file():
        raise CifarpressError(f"engine {model} not found; build one with `cifarpress export --format tensorrt`")
    dataset = read_sidecar(model).get("dataset") or "cifar10"
    test = load_split(dataset, "test", data_root) if accuracy else None
    if device == "jetson":
        from cifarpress.runtime.tegrastats import TegraStatsSampler

        with TegraStatsSampler() as sampler:
            result = bench_engine(model, batch, iters, test)
        result["tegrastats"] = sampler.summary()
        return result, None
    return bench_engine(model, batch, iters, test), None
