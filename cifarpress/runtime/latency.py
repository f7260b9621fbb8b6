"""Measure an ONNX model on the CPU with onnxruntime: latency, throughput, memory, size, accuracy.

Threads are fixed and recorded so two runs on one machine compare; latency
runs in a fresh process (bench_worker) so peak memory belongs to the model.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Collection

from cifarpress.data import CifarSplit
from cifarpress.errors import CifarpressError
from cifarpress.runtime.host import machine_record
from cifarpress.runtime.onnx_file import read_onnx_metadata
from cifarpress.runtime.ort import accuracies, default_threads
from cifarpress.runtime.ort_lowering import lowered_path, lowering_counts
from cifarpress.utils.progress import progress


def machine_description() -> dict:
    """The machine record every measurement carries: CPU, SIMD features (AVX2, AVX-512, VNNI, AMX; NEON
    dot product on ARM), whether its int8 kernels are exact, and the software versions (cifarpress.runtime.host)."""
    return machine_record()


def measure_latency(path: str | Path, batch_sizes=(1, 64), threads: int | None = None,
                    seconds: float = 3.0, warmup: int = 10, lower: bool = True) -> dict:
    threads = threads or default_threads()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # The worker imports no onnx, so it is handed the lowered file.
    with lowered_path(path) if lower else contextlib.nullcontext(Path(path)) as runnable:
        cmd = [sys.executable, "-m", "cifarpress.runtime.worker", str(runnable), "--batches",
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
    run without the int8 lowering (cifarpress.runtime.ort_lowering).

    Returns {"p50": {name: {batch: ms}}, "rounds": {name: [{batch: ms}, ...]}, "onnxruntime": version}."""
    import statistics

    per_round: dict = {name: [] for name in files}
    version = None
    for _ in progress(range(rounds), what=f"timing {len(files)} files in turn", unit="rounds", every=1.0):
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
    measured = accuracies(path, test_split, threads) if test_split is not None else {}
    result.update(measure_latency(path, batch_sizes, threads, seconds))
    lowering = lowering_counts(path)
    result["onnxruntime_lowering"] = lowering
    result["relu_chains_folded_for_onnxruntime"] = lowering["relu_chains"]  # the keys before the full record
    result["weights_dequantized_for_onnxruntime"] = lowering["weights"]
    result.update(measured)
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
            row.update(accuracies(path, test_split, threads))
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
