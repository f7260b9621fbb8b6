"""Measure an ONNX model on the CPU with onnxruntime: latency, throughput, memory, size, accuracy.

Threads are fixed and recorded so two runs on one machine compare; latency
runs in a fresh process (bench_worker) so peak memory belongs to the model.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Collection

import numpy as np
from rich.table import Table

from .data import CifarSplit
from .errors import CifarpressError
from .export import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata
from .ort_lowering import lowered_bytes, lowered_path, lowering_counts


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.system()}


def default_threads() -> int:
    return os.cpu_count() or 1


def make_session(path: str | Path, threads: int | None = None, optimize: bool = True, lower: bool = True):
    """A CPU onnxruntime session; optimize=False runs the graph exactly as written (no fusions, no lowering).

    With optimize and lower, a QDQ graph is first lowered for onnxruntime's CPU kernels
    (cifarpress.ort_lowering): int8 ReLU and ReLU6 chains folded into uint8, duplicate
    quantizations merged, weight-only quantized layers' weights dequantized once."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        lowered = lowered_bytes(path) if optimize and lower else None
        return ort.InferenceSession(lowered or str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CifarpressError(f"onnxruntime cannot load {path} ({str(exc).splitlines()[0][:200]})") from None


def check_input_shape(session, path: str | Path, image_shape: tuple) -> None:
    """One line naming both shapes when the file's input does not take these images (onnxruntime's own
    message names neither)."""
    declared = session.get_inputs()[0].shape  # e.g. ['batch', 3, 32, 32]; symbolic dims are str or None
    fixed = [d for d in declared[1:]]
    if len(declared) != len(image_shape) + 1 or any(isinstance(d, int) and d != want
                                                     for d, want in zip(fixed, image_shape)):
        shown = "x".join(str(d) if isinstance(d, int) else "N" for d in declared)
        raise CifarpressError(f"{path} takes input {shown}, but the images are "
                              f"N{''.join(f'x{d}' for d in image_shape)}; evaluate it on data of its own shape, "
                              f"or export a model for {'x'.join(map(str, image_shape))} inputs")


def onnx_logits(path: str | Path, images, threads: int | None = None, batch: int = 500,
                lower: bool = True) -> np.ndarray:
    """Logits per image through onnxruntime; images NCHW, uint8 (0-255) or float pixels in [0, 1]."""
    session = make_session(path, threads, lower=lower)
    check_input_shape(session, path, tuple(images.shape[1:]))
    logits = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        x = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
        logits.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    return np.concatenate(logits)


def onnx_predictions(path: str | Path, images, threads: int | None = None, batch: int = 500,
                     lower: bool = True) -> np.ndarray:
    """Predicted class per image through onnxruntime (see onnx_logits)."""
    return onnx_logits(path, images, threads, batch, lower).argmax(1)


def onnx_accuracy(path: str | Path, split: CifarSplit, threads: int | None = None, batch: int = 500) -> float:
    """Top-1 (%) of an exported model (inputs in [0, 1]) on a split, through onnxruntime."""
    return 100.0 * float((onnx_predictions(path, split.images, threads, batch) == split.labels.numpy()).mean())


def measure_latency(path: str | Path, batch_sizes=(1, 64), threads: int | None = None,
                    seconds: float = 3.0, warmup: int = 10, lower: bool = True) -> dict:
    threads = threads or default_threads()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # The worker imports no onnx, so it is handed the lowered file.
    with lowered_path(path) if lower else contextlib.nullcontext(Path(path)) as runnable:
        cmd = [sys.executable, "-m", "cifarpress.bench_worker", str(runnable), "--batches",
               ",".join(str(b) for b in batch_sizes), "--threads", str(threads), "--seconds", str(seconds),
               "--warmup", str(warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CifarpressError(f"benchmarking {path} failed: {last[:300]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["threads"] = threads
    return result


def interleaved_latency(files: dict, batch_sizes=(1, 64), threads: int | None = None, seconds: float = 3.0,
                        rounds: int = 3, as_written: Collection[str] = ()) -> dict:
    """p50 latency of several ONNX files measured side by side: every round times each file once, in turn,
    so machine noise hits them alike; the result is the median over rounds. Files named in `as_written`
    run without the int8 lowering (cifarpress.ort_lowering).

    Returns {"p50": {name: {batch: ms}}, "rounds": {name: [{batch: ms}, ...]}, "onnxruntime": version}."""
    import statistics

    per_round: dict = {name: [] for name in files}
    version = None
    for _ in range(rounds):
        for name, path in files.items():
            measured = measure_latency(path, batch_sizes, threads, seconds, lower=name not in as_written)
            per_round[name].append({b: v["p50"] for b, v in measured["latency_ms"].items()})
            version = measured["onnxruntime"]
    p50 = {name: {str(b): statistics.median(r[str(b)] for r in runs) for b in batch_sizes}
           for name, runs in per_round.items()}
    return {"p50": p50, "rounds": per_round, "onnxruntime": version}


def bench_onnx(path: str | Path, batch_sizes=(1, 64), threads: int | None = None,
               test_split: CifarSplit | None = None, seconds: float = 3.0) -> dict:
    """Full measurement of one ONNX file; accuracy only when a test split is given."""
    path = Path(path)
    meta = read_onnx_metadata(path)
    result = {"model": str(path), "onnx_bytes": path.stat().st_size, "dataset": meta.get("dataset")}
    # Accuracy first: a file that cannot take the test images fails before seconds of timing are spent.
    top1 = onnx_accuracy(path, test_split, threads) if test_split is not None else None
    result.update(measure_latency(path, batch_sizes, threads, seconds))
    lowering = lowering_counts(path)
    result["onnxruntime_lowering"] = lowering
    result["relu_chains_folded_for_onnxruntime"] = lowering["relu_chains"]  # the keys before the full record
    result["weights_dequantized_for_onnxruntime"] = lowering["weights"]
    if top1 is not None:
        result["top1"] = top1
    result["machine"] = machine_description()
    return result


def compare_onnx(paths: list[Path], batch_sizes=(1, 64), threads: int | None = None,
                 test_split: CifarSplit | None = None, seconds: float = 3.0, rounds: int = 3) -> dict:
    """Several ONNX files measured side by side: latency timed in turn (interleaved_latency), size, top-1,
    and each one's ratios to the first (the reference)."""
    threads = threads or default_threads()
    names = [str(p) for p in paths]
    if len(set(names)) != len(names):
        raise CifarpressError("compare: the same file is named twice; give each model once")
    latency = interleaved_latency(dict(zip(names, paths)), batch_sizes, threads, seconds, rounds)
    models = []
    for name, path in zip(names, paths):
        row = {"model": name, "onnx_bytes": Path(path).stat().st_size, "latency_ms_p50": latency["p50"][name],
               "latency_rounds": latency["rounds"][name]}
        if test_split is not None:
            row["top1"] = onnx_accuracy(path, test_split, threads)
        models.append(row)
    ref = models[0]
    for row in models:
        row["size_vs_first"] = row["onnx_bytes"] / ref["onnx_bytes"]
        row["latency_vs_first"] = {b: row["latency_ms_p50"][b] / ref["latency_ms_p50"][b]
                                   for b in row["latency_ms_p50"]}
        if "top1" in row:
            row["top1_delta_pp"] = row["top1"] - ref["top1"]
    return {"models": models, "batch_sizes": [int(b) for b in batch_sizes], "threads": threads, "rounds": rounds,
            "seconds": seconds, "onnxruntime": latency["onnxruntime"], "machine": machine_description()}


def compare_table(result: dict) -> Table:
    batches = [str(b) for b in result["batch_sizes"]]
    table = Table(title=f"side by side on {result['machine']['cpu']} (onnxruntime {result['onnxruntime']}, "
                        f"{result['threads']} threads, median of {result['rounds']} rounds)")
    columns = ["model", "top-1 %", "Δ pp", "MB", "size ×"] + [f"b{b} ms" for b in batches] + [f"b{b} ×" for b in batches]
    width = max(len(Path(row["model"]).name) for row in result["models"])
    for col in columns:
        if col == "model":  # the names are what the table is about: never cut them short
            table.add_column(col, no_wrap=True, min_width=min(width, 48), overflow="fold")
        else:
            table.add_column(col, justify="right")
    for row in result["models"]:
        top1 = (f"{row['top1']:.2f}", f"{row['top1_delta_pp']:+.2f}") if "top1" in row else ("-", "-")
        table.add_row(Path(row["model"]).name, *top1, f"{row['onnx_bytes'] / 1e6:.2f}", f"{row['size_vs_first']:.2f}",
                      *(f"{row['latency_ms_p50'][b]:.3f}" for b in batches),
                      *(f"{row['latency_vs_first'][b]:.2f}" for b in batches))
    table.caption = "ratios against the first model"
    return table


def bench_table(result: dict) -> Table:
    lowering = result.get("onnxruntime_lowering") or {  # results recorded before it was kept whole
        "relu_chains": result.get("relu_chains_folded_for_onnxruntime"),
        "weights": result.get("weights_dequantized_for_onnxruntime")}
    table = Table(title=f"{Path(result['model']).name} on {result['machine']['cpu']} "
                        f"(onnxruntime {result['onnxruntime']}, {result['threads']} threads)")
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "images/s"):
        table.add_column(col, justify="right")
    for batch, lat in result["latency_ms"].items():
        table.add_row(batch, f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                      f"{lat['throughput_ips']:.0f}")
    table.caption = (f"size {result['onnx_bytes'] / 1e6:.2f} MB · peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB"
                     + (f" · top-1 {result['top1']:.2f}%" if "top1" in result else "")
                     + (f" · {lowering['relu_chains']} int8 ReLU chains run folded into uint8"
                        if lowering.get("relu_chains") else "")
                     + (f" · {lowering['clip_chains']} ReLU6 Clips run folded into a uint8 quantization"
                        if lowering.get("clip_chains") else "")
                     + (f" · {lowering['merged_quantize']} duplicate QuantizeLinears merged"
                        if lowering.get("merged_quantize") else "")
                     + (f" · {lowering['weights']} weight-only quantized layers run with their weights "
                        f"dequantized once at load" if lowering.get("weights") else ""))
    return table
