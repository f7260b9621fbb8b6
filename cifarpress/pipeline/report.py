"""report.json (stable, for scripts) and report.md (for people) of a compress run.

report.json keeps this shape; fields are only ever added:
    {"recipe": str, "dataset": str, "test_set": str, "machine": {cpu, cores, simd, int8_kernels, versions, ...},
     "provenance": {"created", "command", "recipe_sha256", "versions"}, "deployable": {...} | null,
     "plot": "report.png" | null,
     (with export format tensorrt, "deployable" is the engine and its "tensorrt" field holds the
      engine's GPU measurements beside a "reference" engine of the starting model, with "ratios")
     "stages": [{"stage": str, "top1": float, "params": int, "macs": int, "onnx_bytes": int,
                 "top1_graph": float (QDQ rows: the graph's own math; "top1" is this CPU's kernels),
                 "latency_ms": {"<batch>": {"p50": float, "p50_range": [min, max], "p90": float, "p99": float}},
                 "latency_rounds": int,
                 "ratios": {"params": float, "macs": float, "onnx_bytes": float,
                            "latency_p50_b<batch>": float}, ...}]}
Ratios are against the first row (the model the recipe started from).
"plot" names the Pareto plot (cifarpress/plot.py) next to the report; null when it could not be drawn.
"""
from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from cifarpress.pipeline.plot import write_pareto_plot
from cifarpress.runtime.host import describe_machine
from cifarpress.utils.io import atomic_write_json, atomic_write_text

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
    graph = any("top1_graph" in row for row in rows)
    rounds = rows[0].get("latency_rounds") if rows else None
    timing = (f"p50 is the median of {rounds} interleaved rounds (each round times every row once, in turn), "
              f"with the range over rounds; p99 is from the stage's own run" if rounds
              else "each row timed once, when its stage ran")
    lines = [
        f"# cifarpress report: {report['recipe']}",
        "",
        f"Dataset {report['dataset']}{' (' + report['test_set'] + ')' if report.get('test_set') else ''}. "
        f"Measured on {describe_machine(m) if 'simd' in m else m['cpu']} ({m['cores']} cores), onnxruntime "
        f"{rows[0]['onnxruntime'] if rows else '?'} CPU, {rows[0]['threads'] if rows else '?'} threads; "
        f"top-1 on the full test set through onnxruntime; {timing}.",
        "",
        "| stage | top-1 % | Δ pp | " + ("graph top-1 % | " if graph else "") + "params | MACs | ONNX MB | "
        + " | ".join(f"p50 ms b{b} | p99 ms b{b}" for b in batches) + " |",
        "|" + "---|" * (6 + graph + 2 * len(batches)),
    ]
    for row in rows:
        r = row["ratios"]
        cells = [row["stage"], f"{row['top1']:.2f}", f"{r['top1_delta_pp']:+.2f}"]
        if graph:
            cells.append(f"{row['top1_graph']:.2f}" if "top1_graph" in row else "=")
        cells += [f"{row['params']:,} ({_fmt_ratio(r['params'])})", f"{row['macs'] / 1e6:.1f}M ({_fmt_ratio(r['macs'])})",
                  f"{row['onnx_bytes'] / 1e6:.2f} ({_fmt_ratio(r['onnx_bytes'])})"]
        for b in batches:
            lat = row["latency_ms"][b]
            spread = (f" [{lat['p50_range'][0]:.3f}–{lat['p50_range'][1]:.3f}]" if lat.get("p50_range") else "")
            cells += [f"{lat['p50']:.3f}{spread} ({_fmt_ratio(r[f'latency_p50_b{b}'])})", f"{lat['p99']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if graph:
        lines.append("- graph top-1: a quantized row's own QDQ math (onnxruntime with its fusions off), what a "
                     "TensorRT engine is built from; top-1 is what onnxruntime's kernels on this CPU give "
                     "('=' for float rows, where the two agree)")
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
                              + (f".{layer['frac_bits']}" if "frac_bits" in layer else "")  # fixed point <WL.FL>
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


def provenance(recipe) -> dict:
    """How the report was made: when, by which command and cifarpress commit, from which recipe (its hash)."""
    dump = recipe.model_dump() if hasattr(recipe, "model_dump") else vars(recipe)
    text = json.dumps(dump, sort_keys=True, default=str)
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["cifarpress"] + sys.argv[1:]) if Path(sys.argv[0]).name == "cifarpress" else None,
            "recipe_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _keep_creation_time(path: Path, report: dict) -> None:
    """A re-run that measured nothing new writes the same report: keep the earlier one's time and command."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    moved = ("created", "command")
    strip = lambda r: {**r, "plot": None, "provenance": {k: v for k, v in (r.get("provenance") or {}).items()  # noqa: E731
                                                         if k not in moved}}
    if strip(json.loads(json.dumps(report))) == strip(earlier):
        report["provenance"].update({k: earlier["provenance"].get(k) for k in moved})


def write_report(run_dir: Path, recipe, rows: list[dict], artifacts: list[dict], machine: dict,
                 test_set: str | None = None) -> dict:
    """report.json and report.md first, then report.png; if drawing fails, the two stay with "plot": null."""
    run_dir = Path(run_dir)
    report = {"recipe": recipe.name, "dataset": recipe.dataset, "test_set": test_set, "machine": machine,
              "provenance": provenance(recipe) | {"versions": machine.get("versions")},
              "deployable": artifacts[-1] if artifacts else None, "stages": add_ratios(rows), "plot": None}
    _keep_creation_time(run_dir / "report.json", report)
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
