"""report.json (stable, for scripts) and report.md (for people) of a compress run.

report.json keeps this shape; fields are only ever added:
    {"recipe": str, "dataset": str, "machine": {...}, "deployable": {...} | null,
     "plot": "report.png" | null,
     (with export format tensorrt, "deployable" is the engine and its "tensorrt" field holds the
      engine's GPU measurements beside a "reference" engine of the starting model, with "ratios")
     "stages": [{"stage": str, "top1": float, "params": int, "macs": int, "onnx_bytes": int,
                 "latency_ms": {"<batch>": {"p50": float, "p90": float, "p99": float}},
                 "ratios": {"params": float, "macs": float, "onnx_bytes": float,
                            "latency_p50_b<batch>": float}, ...}]}
Ratios are against the first row (the model the recipe started from).
"plot" names the Pareto plot (cifarpress/plot.py) next to the report; null when it could not be drawn.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .checkpoint import atomic_write_json, atomic_write_text
from .plot import write_pareto_plot

PLOT_NAME = "report.png"


def add_ratios(rows: list[dict]) -> list[dict]:
    if not rows:
        return rows
    ref = rows[0]
    for row in rows:
        ratios = {k: row[k] / ref[k] if ref[k] else None for k in ("params", "macs", "onnx_bytes")}
        for batch, lat in row["latency_ms"].items():
            base = ref["latency_ms"].get(batch, {}).get("p50")
            ratios[f"latency_p50_b{batch}"] = lat["p50"] / base if base else None
        ratios["top1_delta_pp"] = row["top1"] - ref["top1"]
        row["ratios"] = ratios
    return rows


def _fmt_ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def render_markdown(report: dict) -> str:
    rows = report["stages"]
    batches = list(rows[0]["latency_ms"]) if rows else []
    m = report["machine"]
    lines = [
        f"# cifarpress report: {report['recipe']}",
        "",
        f"Dataset {report['dataset']}. Measured on {m['cpu']} ({m['cores']} cores), onnxruntime "
        f"{rows[0]['onnxruntime'] if rows else '?'} CPU, {rows[0]['threads'] if rows else '?'} threads; "
        f"top-1 on the full test set through onnxruntime.",
        "",
        "| stage | top-1 % | Δ pp | params | MACs | ONNX MB | "
        + " | ".join(f"p50 ms b{b} | p99 ms b{b}" for b in batches) + " |",
        "|" + "---|" * (6 + 2 * len(batches)),
    ]
    for row in rows:
        r = row["ratios"]
        cells = [row["stage"], f"{row['top1']:.2f}", f"{r['top1_delta_pp']:+.2f}",
                 f"{row['params']:,} ({_fmt_ratio(r['params'])})", f"{row['macs'] / 1e6:.1f}M ({_fmt_ratio(r['macs'])})",
                 f"{row['onnx_bytes'] / 1e6:.2f} ({_fmt_ratio(r['onnx_bytes'])})"]
        for b in batches:
            lat = row["latency_ms"][b]
            cells += [f"{lat['p50']:.3f} ({_fmt_ratio(r[f'latency_p50_b{b}'])})", f"{lat['p99']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for row in rows:
        c = row["onnx_check"]
        against = f" ({row['onnx_check_reference']})" if row.get("onnx_check_reference") else ""
        lines.append(f"- {row['stage']}: ONNX vs PyTorch{against} on {c['images']} test images: max |Δ logit| "
                     f"{c['max_abs_diff']:.2e}, top-1 agreement {c['top1_agreement']:.2f}%; PyTorch top-1 "
                     f"{row['top1_torch']:.2f}%")
    lowered = [row["stage"] for row in rows if any(row.get("onnxruntime_lowering", {}).values())]
    if lowered:
        lines.append(f"- {', '.join(lowered)}: timed as cifarpress runs QDQ graphs in onnxruntime (int8 ReLU and ReLU6 "
                     f"chains folded into uint8, duplicate quantizations merged, weight-only quantized layers "
                     f"dequantized at load); `cifarpress lower model.onnx` writes that graph for plain onnxruntime")
    ref_bytes = rows[0]["onnx_bytes"] if rows else 0
    for row in rows:
        if row.get("packed_bytes"):
            lines.append(f"- {row['stage']}: packed 2-bit artifact {row['packed_bytes'] / 1e3:.1f} KB "
                         f"({row['packed_bytes'] / ref_bytes:.3f}× the first row's ONNX), QDQ ONNX "
                         f"{row['onnx_bytes'] / 1e3:.1f} KB")
        if row.get("layers"):
            cells = ", ".join(f"{layer['name']} {layer['precision']}"
                              + (f" ({100 * layer['zero_fraction']:.0f}% zeros)" if layer["precision"] == "ternary" else "")
                              for layer in row["layers"])
            lines.append(f"- {row['stage']} layer precisions: {cells}")
    if report.get("deployable"):
        d = report["deployable"]
        lines += ["", f"Deployable artifact: `{d['artifact']}` ({d['format']}, {d['bytes'] / 1e6:.2f} MB)."]
        if d.get("tensorrt"):
            lines += [""] + _tensorrt_lines(d["tensorrt"])
    if report.get("plot"):
        lines += ["", f"Pareto plot (top-1 vs latency and vs ONNX size): [{report['plot']}]({report['plot']})",
                  "", f"![top-1 vs latency and ONNX size]({report['plot']})"]
    return "\n".join(lines) + "\n"


def _tensorrt_lines(trt: dict) -> list[str]:
    """The engine beside the reference engine of the starting model, both timed on the GPU in this run."""
    ref, ratios = trt["reference"], trt.get("ratios", {})
    batches = list(trt["latency_ms"])
    lines = [f"TensorRT {trt['tensorrt']} on {trt['gpu']}: latency includes host copies; top-1 on the full test "
             f"set through the engine.", "",
             "| engine | precision | top-1 % | MB | " + " | ".join(f"p50 ms b{b} | p99 ms b{b}" for b in batches) + " |",
             "|" + "---|" * (4 + 2 * len(batches))]

    def row(label: str, engine: dict, ratio=lambda key: "") -> str:
        cells = [label, engine["precision"], f"{engine['top1']:.2f}",
                 f"{engine['engine_bytes'] / 1e6:.2f}{ratio('engine_bytes')}"]
        for b in batches:
            lat = engine["latency_ms"][b]
            cells += [f"{lat['p50']:.3f}{ratio(f'latency_p50_b{b}')}", f"{lat['p99']:.3f}"]
        return "| " + " | ".join(cells) + " |"

    if "latency_ms" in ref:
        lines.append(row("starting model", ref))
    lines.append(row("deployable", trt, lambda key: f" ({_fmt_ratio(ratios.get(key))})"))
    if "error" in ref:
        lines += ["", f"No reference engine: {ref['error']}"]
    return lines


def _write_json_md(run_dir: Path, report: dict) -> None:
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))


def write_report(run_dir: Path, recipe, rows: list[dict], artifacts: list[dict], machine: dict) -> dict:
    """report.json and report.md first, then report.png; if drawing fails, the two stay with "plot": null."""
    run_dir = Path(run_dir)
    report = {"recipe": recipe.name, "dataset": recipe.dataset, "machine": machine,
              "deployable": artifacts[-1] if artifacts else None, "stages": add_ratios(rows), "plot": None}
    _write_json_md(run_dir, report)
    try:
        if rows:
            write_pareto_plot(run_dir / PLOT_NAME, report)
            report["plot"] = PLOT_NAME
    except Exception as exc:  # a plot is a convenience: never lose the report over it
        print(f"warning: {PLOT_NAME} not drawn ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
    if report["plot"]:
        _write_json_md(run_dir, report)
    else:
        (run_dir / PLOT_NAME).unlink(missing_ok=True)  # not a stale plot of an earlier run
    return report
