"""Rich tables for bench and compare results."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from cifarpress.runtime.host import describe_machine


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
