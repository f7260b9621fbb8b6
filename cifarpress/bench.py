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

import numpy as np
from rich.console import Console
from rich.table import Table

from .data import CifarSplit
from .errors import CifarpressError

warn_console = Console(stderr=True)
from .export import INPUT_NAME, OUTPUT_NAME, read_onnx_metadata
from .host import describe_machine, machine_record
from .progress import progress
from .ort_lowering import lower_file, lowered_path, lowering_counts


def machine_description() -> dict:
    """The machine record every measurement carries: CPU, SIMD features (AVX2, AVX-512, VNNI, AMX; NEON
    dot product on ARM), whether its int8 kernels are exact, and the software versions (cifarpress.host)."""
    return machine_record()


def default_threads() -> int:
    return os.cpu_count() or 1


_warned_reduced: set[str] = set()


def warn_reduced_range(path: str | Path, counts: dict) -> None:
    """One line, once per file, when this host runs a file's int8 weights in 7-bit range (no VNNI)."""
    if counts.get("weights_7bit") and str(path) not in _warned_reduced:
        _warned_reduced.add(str(path))
        warn_console.print(
            f"note: this CPU has no VNNI, so onnxruntime's int8 kernels would saturate: {Path(path).name} runs "
            f"with its {counts['weights_7bit']} integer-kernel weights in 7-bit range here (exact on this host; "
            f"'graph' accuracy is the file's own QDQ math, what TensorRT builds)", highlight=False, markup=False)


def make_session(path: str | Path, threads: int | None = None, optimize: bool = True, lower: bool = True,
                 reduce_range: bool | None = None):
    """A CPU onnxruntime session; optimize=False runs the graph exactly as written (no fusions, no lowering):
    for a QDQ file, the file's own quantized math computed in float, the reference a TensorRT engine builds on.

    With optimize and lower, a QDQ graph is first lowered for onnxruntime's CPU kernels
    (cifarpress.ort_lowering): int8 ReLU and ReLU6 chains folded into uint8, duplicate
    quantizations merged, weight-only quantized layers' weights dequantized once, and on a host
    whose int8 kernels saturate (reduce_range None: no VNNI) integer-kernel weights in 7-bit range."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        lowered = None
        if optimize and lower:
            lowered, counts = lower_file(path, reduce_range)
            warn_reduced_range(path, counts)
        return ort.InferenceSession(lowered or str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CifarpressError(f"onnxruntime cannot load {path} ({str(exc).splitlines()[0][:200]})") from None


def check_input_shape(session, path: str | Path, image_shape: tuple) -> None:
    """One line naming both shapes when the file's input does not take these images (onnxruntime's own
    message names neither)."""
    declared = session.get_inputs()[0].shape  # e.g. ['batch', 3, 32, 32]; symbolic dims are str or None
    if len(declared) != len(image_shape) + 1 or any(isinstance(d, int) and d != want
                                                     for d, want in zip(declared[1:], image_shape)):
        shown = "x".join(str(d) if isinstance(d, int) else "N" for d in declared)
        raise CifarpressError(f"{path} takes input {shown}, but the images are "
                              f"N{''.join(f'x{d}' for d in image_shape)}; evaluate it on data of its own shape, "
                              f"or export a model for {'x'.join(map(str, image_shape))} inputs")


def onnx_logits(path: str | Path, images, threads: int | None = None, batch: int = 500,
                lower: bool = True, exact: bool = False) -> np.ndarray:
    """Logits per image through onnxruntime; images NCHW, uint8 (0-255) or float pixels in [0, 1].

    exact: the graph's own math (no fusions: a QDQ graph's quantization computed in float) instead of
    this host's kernels."""
    session = make_session(path, threads, optimize=not exact, lower=lower)
    check_input_shape(session, path, tuple(images.shape[1:]))
    logits = []
    for start in progress(range(0, len(images), batch), what=f"onnxruntime on {len(images)} images"):
        x = images[start:start + batch]
        x = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
        logits.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    return np.concatenate(logits)


def onnx_predictions(path: str | Path, images, threads: int | None = None, batch: int = 500,
                     lower: bool = True, exact: bool = False) -> np.ndarray:
    """Predicted class per image through onnxruntime (see onnx_logits)."""
    return onnx_logits(path, images, threads, batch, lower, exact).argmax(1)


def onnx_accuracy(path: str | Path, split: CifarSplit, threads: int | None = None, batch: int = 500,
                  exact: bool = False) -> float:
    """Top-1 (%) of an exported model (inputs in [0, 1]) on a split, through onnxruntime (exact: the graph's
    own math rather than this host's kernels)."""
    predictions = onnx_predictions(path, split.images, threads, batch, exact=exact)
    return 100.0 * float((predictions == split.labels.numpy()).mean())


def is_quantized_graph(path: str | Path) -> bool:
    """A QDQ file, whose accuracy on this host's kernels can differ from its own math."""
    import onnx

    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for n in onnx.load(str(path), load_external_data=False).graph.node)


def accuracies(path: str | Path, split: CifarSplit, threads: int | None = None) -> dict:
    """{"top1": as this host runs it} plus, for a QDQ file, {"top1_graph": the file's own math}."""
    result = {"top1": onnx_accuracy(path, split, threads)}
    if is_quantized_graph(path):
        result["top1_graph"] = onnx_accuracy(path, split, threads, exact=True)
    return result


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


def compare_table(result: dict) -> Table:
    batches = [str(b) for b in result["batch_sizes"]]
    table = Table(title=f"side by side on {describe_machine(result['machine'])} (onnxruntime "
                        f"{result['onnxruntime']}, {result['threads']} threads, median of {result['rounds']} rounds)")
    graph = any("top1_graph" in row for row in result["models"])
    columns = (["model", "top-1 %", "Δ pp"] + (["graph top-1 %"] if graph else []) + ["MB", "size ×"]
               + [f"b{b} ms" for b in batches] + [f"b{b} ×" for b in batches])
    width = max(len(Path(row["model"]).name) for row in result["models"])
    for col in columns:
        if col == "model":  # the names are what the table is about: never cut them short
            table.add_column(col, no_wrap=True, min_width=min(width, 48), overflow="fold")
        else:
            table.add_column(col, justify="right")
    for row in result["models"]:
        top1 = (f"{row['top1']:.2f}", f"{row['top1_delta_pp']:+.2f}") if "top1" in row else ("-", "-")
        if graph:
            top1 += (f"{row['top1_graph']:.2f}" if "top1_graph" in row else "=",)
        table.add_row(Path(row["model"]).name, *top1, f"{row['onnx_bytes'] / 1e6:.2f}", f"{row['size_vs_first']:.2f}",
                      *(f"{row['latency_ms_p50'][b]:.3f}" for b in batches),
                      *(f"{row['latency_vs_first'][b]:.2f}" for b in batches))
    table.caption = "ratios against the first model" + (
        "; top-1 as this CPU's onnxruntime runs each file, graph top-1 the QDQ file's own math (what TensorRT "
        "builds; '=' for float files, where the two agree)" if graph else "")
    return table


def bench_table(result: dict) -> Table:
    lowering = result.get("onnxruntime_lowering") or {  # results recorded before it was kept whole
        "relu_chains": result.get("relu_chains_folded_for_onnxruntime"),
        "weights": result.get("weights_dequantized_for_onnxruntime")}
    machine = describe_machine(result["machine"]) if "simd" in result["machine"] else result["machine"]["cpu"]
    table = Table(title=f"{Path(result['model']).name} on {machine} "
                        f"(onnxruntime {result['onnxruntime']}, {result['threads']} threads)")
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "images/s"):
        table.add_column(col, justify="right")
    for batch, lat in result["latency_ms"].items():
        table.add_row(batch, f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                      f"{lat['throughput_ips']:.0f}")
    table.caption = (f"size {result['onnx_bytes'] / 1e6:.2f} MB · peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB"
                     + (f" · top-1 {result['top1']:.2f}%" if "top1" in result else "")
                     + (f" (graph's own math {result['top1_graph']:.2f}%)" if "top1_graph" in result else "")
                     + (f" · {lowering['weights_7bit']} int8 weights run in 7-bit range (no VNNI here)"
                        if lowering.get("weights_7bit") else "")
                     + (f" · {lowering['relu_chains']} int8 ReLU chains run folded into uint8"
                        if lowering.get("relu_chains") else "")
                     + (f" · {lowering['clip_chains']} ReLU6 Clips run folded into a uint8 quantization"
                        if lowering.get("clip_chains") else "")
                     + (f" · {lowering['merged_quantize']} duplicate QuantizeLinears merged"
                        if lowering.get("merged_quantize") else "")
                     + (f" · {lowering['weights']} weight-only quantized layers run with their weights "
                        f"dequantized once at load" if lowering.get("weights") else ""))
    return table
