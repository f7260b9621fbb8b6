"""Latency worker, run in a fresh process so its peak memory is the model's, not the caller's.

    python -m cifarpress.runtime.worker MODEL.onnx --batches 1,64 --threads 2

prints one JSON object: latency percentiles per batch size, throughput, peak RSS.
Imports only numpy, onnxruntime and cifarpress.utils.memory on purpose.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cifarpress.utils.memory import peak_rss_bytes, rss_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--min-iters", type=int, default=30)
    parser.add_argument("--max-iters", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per batch size")
    args = parser.parse_args()

    import onnxruntime as ort

    baseline = rss_bytes()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0]
    name = declared.name
    # The file's own input shape (a user's model need not take 3x32x32); symbolic dims get CIFAR's.
    image_shape = [d if isinstance(d, int) else cifar for d, cifar in zip(declared.shape[1:], (3, 32, 32))]
    rng = np.random.default_rng(0)
    results = {}
    for batch in (int(b) for b in args.batches.split(",")):
        x = rng.random((batch, *image_shape), dtype=np.float32)
        for _ in range(args.warmup):
            session.run(None, {name: x})
        times = []
        start = time.perf_counter()
        while len(times) < args.max_iters and (len(times) < args.min_iters or time.perf_counter() - start < args.seconds):
            t0 = time.perf_counter()
            session.run(None, {name: x})
            times.append((time.perf_counter() - t0) * 1e3)
        t = np.asarray(times)
        results[str(batch)] = {
            "p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
            "p99": float(np.percentile(t, 99)), "mean": float(t.mean()), "iters": len(t),
            "throughput_ips": float(batch * 1e3 / t.mean()),
        }
    peak = peak_rss_bytes()
    print(json.dumps({"latency_ms": results, "peak_rss_bytes": peak, "model_rss_bytes": max(0, peak - baseline),
                      "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider"}))


if __name__ == "__main__":
    main()
