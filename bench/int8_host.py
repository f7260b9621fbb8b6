"""int8 on this CPU: the graph's own accuracy beside what onnxruntime's kernels give, full-range and 7-bit.

    python bench/int8_host.py FP32.onnx INT8.onnx [FP32.onnx INT8.onnx ...] [--threads 1] [--out F.json]

For each pair (the float file and its int8 QDQ file) it reports, on the test set
named by $CIFARPRESS_DATA (all 10,000 images, and images 0-999 alone):
  fp32              the float file
  graph             the int8 file's own QDQ math (onnxruntime with graph optimizations off): what a
                    TensorRT engine builds on, the same on every CPU
  ort-full          the lowered graph with 8-bit weights on this CPU's integer kernels (what cifarpress ran
                    before it looked at the CPU; exact only with VNNI)
  ort-7bit          the lowered graph with weights requantized to [-64, 64] (what cifarpress runs on CPUs
                    without VNNI; exact on every CPU)
  as-written        the file in plain onnxruntime, no lowering
and p50 latency at batch 1 and 64 of fp32, ort-full and ort-7bit, timed in interleaved rounds. The machine
record (CPU flags, versions) says which kind of CPU produced the figures: run it on both kinds to compare.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from cifarpress.runtime.latency import interleaved_latency, machine_description
from cifarpress.utils.io import atomic_write_json
from cifarpress.data import load_split
from cifarpress.runtime.host import describe_machine
from cifarpress.runtime.ort_lowering import lowered_bytes
from harness import command_line, with_provenance  # bench/harness.py: a script's own folder is on sys.path

RESULTS = Path(__file__).parent / "results"


def predictions(model, x: np.ndarray, threads: int, optimize: bool) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], {"input": x[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(x), 500)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="pairs: FP32.onnx INT8.onnx")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_host.json")
    args = parser.parse_args()
    if len(args.files) % 2:
        sys.exit("give the files in pairs: FP32.onnx INT8.onnx")
    test = load_split("cifar10", "test")
    x, y = test.images.numpy().astype(np.float32) / 255, test.labels.numpy()
    first = slice(0, 1000)
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for fp32, int8 in zip(args.files[::2], args.files[1::2]):
            full, reduced = Path(tmp) / f"{int8.stem}.full.onnx", Path(tmp) / f"{int8.stem}.7bit.onnx"
            full.write_bytes(lowered_bytes(int8, reduce_range=False))
            reduced.write_bytes(lowered_bytes(int8, reduce_range=True))
            arms = {"fp32": (str(fp32), True), "graph": (str(int8), False), "ort-full": (full.read_bytes(), True),
                    "ort-7bit": (reduced.read_bytes(), True), "as-written": (str(int8), True)}
            preds = {name: predictions(model, x, args.threads, optimize) for name, (model, optimize) in arms.items()}
            top1 = {name: 100 * float((p == y).mean()) for name, p in preds.items()}
            top1_first = {name: 100 * float((p[first] == y[first]).mean()) for name, p in preds.items()}
            files = {"fp32": fp32, "ort-full": full, "ort-7bit": reduced}
            latency = interleaved_latency(files, (1, 64), args.threads, args.seconds, args.rounds,
                                          as_written=set(files))
            pairs.append({
                "fp32_file": str(fp32), "int8_file": str(int8), "top1": top1, "top1_images_0_999": top1_first,
                "delta_vs_fp32_pp": {k: v - top1["fp32"] for k, v in top1.items()},
                "agreement_with_graph": {k: 100 * float((p == preds["graph"]).mean()) for k, p in preds.items()},
                "latency_ms_p50": latency["p50"],
                "latency_vs_fp32": {k: {b: v[b] / latency["p50"]["fp32"][b] for b in v}
                                    for k, v in latency["p50"].items()},
            })
            row = pairs[-1]
            print(f"{int8.name}: " + ", ".join(f"{k} {v:.2f}%" for k, v in top1.items())
                  + " | b64 x fp32: " + ", ".join(f"{k} {v['64']:.2f}" for k, v in row["latency_vs_fp32"].items()),
                  flush=True)
    machine = machine_description()
    result = {"command": command_line(), "machine": machine, "threads": args.threads,
              "rounds": args.rounds, "seconds": args.seconds,
              "test_set": "CIFAR-10 test, images 0-999 official pixels, 1000-9999 JPEG (build_cifar10.py --test mixed)",
              "pairs": pairs}
    atomic_write_json(args.out, with_provenance(result))
    print(f"on {describe_machine(machine)}: wrote {args.out}")


if __name__ == "__main__":
    main()
