"""report.png: accuracy against latency and against ONNX size, one point per report row, Pareto front joined.

matplotlib is imported inside `write_pareto_plot` (and drawn through its Agg canvas, without pyplot, so no
global backend is switched), which keeps `import cifarpress` fast.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from .checkpoint import atomic_write

PREFERRED_BATCH = "64"


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point dominates, by increasing cost.

    A point is dominated when another has cost <= and accuracy >= with at least one strictly
    better. Points with a missing (None) cost or accuracy take no part. Equal points are all kept.
    """
    valid = [(i, c, a) for i, (c, a) in enumerate(points) if c is not None and a is not None]
    front = [i for i, c, a in valid
             if not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for _, c2, a2 in valid)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def latency_point(row: dict, preferred: str = PREFERRED_BATCH) -> tuple[str, float] | None:
    """(batch, p50 ms) at the preferred batch size, else at the largest batch the row has; None if none."""
    lat = row.get("latency_ms") or {}
    if preferred in lat and lat[preferred].get("p50") is not None:
        return preferred, lat[preferred]["p50"]
    batches = sorted((b for b in lat if lat[b].get("p50") is not None), key=int)
    return (batches[-1], lat[batches[-1]]["p50"]) if batches else None


def latency_label(batches: dict[int, str], names: list[str], preferred: str = PREFERRED_BATCH) -> str:
    """x-axis label naming the batch size each row's latency was read at (batches: row index -> batch)."""
    if not batches:
        return "onnxruntime latency p50 (ms): none measured"
    counts = Counter(batches.values())
    main = preferred if preferred in counts else counts.most_common(1)[0][0]
    label = f"onnxruntime latency p50 at batch {main} (ms)"
    if main != preferred:
        label += f"; no batch-{preferred} measurement"
    others = {}
    for i, b in batches.items():
        if b != main:
            others.setdefault(b, []).append(names[i])
    for b, who in sorted(others.items(), key=lambda kv: int(kv[0])):
        label += f"; batch {b} for {', '.join(who)}"
    return label


def point_names(rows: list[dict]) -> list[str]:
    """Stage names; a name used by several rows gets its stage folder's name instead (01-train, 03-train)."""
    counts = Counter(row["stage"] for row in rows)
    return [Path(row["dir"]).name if counts[row["stage"]] > 1 and row.get("dir") else row["stage"] for row in rows]


def machine_title(report: dict) -> str:
    m = report.get("machine") or {}
    parts = [str(m.get("cpu", "unknown CPU"))]
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("system"):
        parts.append(str(m["system"]))
    rows = report.get("stages") or []
    if rows and rows[0].get("onnxruntime"):
        parts.append(f"onnxruntime {rows[0]['onnxruntime']}"
                     + (f", {rows[0]['threads']} thread{'s' if rows[0]['threads'] != 1 else ''}"
                        if rows[0].get("threads") else ""))
    return ", ".join(parts)


def _panel(ax, xs: list, ys: list, names: list[str], xlabel: str, log: bool = False) -> None:
    idx = [i for i, x in enumerate(xs) if x is not None and ys[i] is not None]
    front = pareto_front(list(zip(xs, ys)))  # it skips the points with a missing value itself
    rest = [i for i in idx if i not in front]
    if rest:
        ax.scatter([xs[i] for i in rest], [ys[i] for i in rest], s=40, facecolors="none",
                   edgecolors="tab:gray", label="dominated", zorder=3)
    if front:
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", color="tab:blue", markersize=7,
                label="Pareto front", zorder=4)
    for i in idx:
        ax.annotate(names[i], (xs[i], ys[i]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if log:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(0.15)
    if idx:
        ax.legend(loc="lower right", fontsize=8)


def write_pareto_plot(path: str | Path, report: dict) -> Path:
    """Draw report.png for a report dict (report.json's shape) and write it atomically to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["stages"]
    names = point_names(rows)
    acc = [row.get("top1") for row in rows]
    lat_points = [latency_point(row) for row in rows]
    latency = [p[1] if p else None for p in lat_points]
    lat_batches = {i: p[0] for i, p in enumerate(lat_points) if p}
    size = [row["onnx_bytes"] / 1e6 if row.get("onnx_bytes") else None for row in rows]
    sizes = [s for s in size if s]
    log_size = bool(sizes) and max(sizes) / min(sizes) > 10

    fig = Figure(figsize=(13, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_lat, ax_size = fig.subplots(1, 2)
    _panel(ax_lat, latency, acc, names, latency_label(lat_batches, names))
    _panel(ax_size, size, acc, names, "ONNX size (MB" + (", log scale)" if log_size else ")"), log=log_size)
    ax_lat.set_title("accuracy vs latency")
    ax_size.set_title("accuracy vs model size")
    fig.suptitle(f"cifarpress {report['recipe']}: accuracy / cost Pareto front\n{machine_title(report)}")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
