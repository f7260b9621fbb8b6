"""Where does onnxruntime spend the time? Kernel time per operator type, for several ONNX files side by side.

    python bench/ort_op_profile.py bench/results/resnet20-fp32.onnx bench/results/resnet20-int8-qdq.onnx
                                   [--batch 64] [--runs 20] [--threads 1] [--as-written] [--out FILE.json]

Each file runs `--runs` times on one random batch after a warm-up, with
onnxruntime's own profiler on (after its graph optimizations, so the fused
kernels it really runs are the ones counted: QLinearConv, not DQ -> Conv -> Q).
Prints ms per run for each operator type and the total, and the ratio of each
file's total to the first file's. Int8 QDQ files run lowered, as cifarpress runs
them (cifarpress.runtime.ort_lowering); --as-written profiles them as the file says.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from cifarpress.runtime.latency import machine_description
from cifarpress.utils.io import atomic_write_json
from cifarpress.runtime.onnx_file import INPUT_NAME
from cifarpress.runtime.ort_lowering import lowered_bytes
from harness import with_provenance  # bench/harness.py: a script's own folder is on sys.path


def profile_ops(path: Path, batch: int, runs: int, threads: int, workdir: Path, lower: bool = True) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / path.stem)
    model = lowered_bytes(path) if lower else None
    session = ort.InferenceSession(model or str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    for _ in range(runs):
        session.run(None, {INPUT_NAME: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    micros, nodes = Counter(), Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    ms = {op: total / runs / 1000 for op, total in micros.most_common()}
    return {"ms_per_run": ms, "nodes": {op: nodes[op] // runs for op in ms}, "total_ms": sum(ms.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--as-written", action="store_true", help="no load-time int8 lowering")
    args = parser.parse_args()
    for f in args.files:
        if not f.is_file():
            parser.error(f"{f} not found")
    with tempfile.TemporaryDirectory() as tmp:
        profiles = {str(f): profile_ops(f, args.batch, args.runs, args.threads, Path(tmp),
                                         not args.as_written) for f in args.files}
    first = profiles[str(args.files[0])]["total_ms"]
    table = Table(title=f"onnxruntime {ort.__version__} kernel time per run, batch {args.batch}, "
                        f"{args.threads} thread(s), {args.runs} runs")
    table.add_column("file")
    table.add_column("total ms", justify="right")
    table.add_column("× first", justify="right")
    table.add_column("by operator (ms, nodes)")
    for name, p in profiles.items():
        p["vs_first"] = p["total_ms"] / first
        ops = ", ".join(f"{op} {ms:.2f} ({p['nodes'][op]})" for op, ms in p["ms_per_run"].items() if ms >= 0.05)
        table.add_row(Path(name).name, f"{p['total_ms']:.2f}", f"{p['vs_first']:.2f}", ops)
    Console(width=160).print(table)
    if args.out:
        atomic_write_json(args.out, with_provenance({"batch": args.batch, "runs": args.runs, "threads": args.threads,
                                                     "onnxruntime": ort.__version__, "machine": machine_description(),
                                                     "lowered": not args.as_written, "files": profiles}))


if __name__ == "__main__":
    main()
