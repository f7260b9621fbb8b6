"""report.png: accuracy against batch-1 and batch-64 latency and against shipped size, one point per report row.

The Pareto front (rows no other row beats on both axes) is marked, not joined: a line between two
measured models would draw trade-offs nobody measured. Latency points carry the range over the
report's interleaved timing rounds.

matplotlib is imported inside `write_pareto_plot` (and drawn through its Agg canvas, without pyplot, so no
global backend is switched), which keeps `import cifarpress` fast.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from cifarpress.runtime.host import describe_machine
from cifarpress.utils.io import atomic_write


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point dominates, by increasing cost.

    A point is dominated when another has cost <= and accuracy >= with at least one strictly
    better. Points with a missing (None) cost or accuracy take no part. Equal points are all kept.
    """
    valid = [(i, c, a) for i, (c, a) in enumerate(points) if c is not None and a is not None]
    front = [i for i, c, a in valid
             if not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for _, c2, a2 in valid)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def point_names(rows: list[dict]) -> list[str]:
    """Stage names; a name used by several rows gets its stage folder's name instead (01-train, 03-train)."""
    counts = Counter(row["stage"] for row in rows)
    return [Path(row["dir"]).name if counts[row["stage"]] > 1 and row.get("dir") else row["stage"] for row in rows]


def machine_title(report: dict) -> str:
    m = report.get("machine") or {}
    parts = [describe_machine(m) if m.get("simd") else str(m.get("cpu", "unknown CPU"))]
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


def _panel(ax, xs: list, ys: list, names: list[str], xlabel: str, log: bool = False,
           xerr: list | None = None) -> None:
    idx = [i for i, x in enumerate(xs) if x is not None and ys[i] is not None]
    front = pareto_front(list(zip(xs, ys)))  # it skips the points with a missing value itself
    rest = [i for i in idx if i not in front]
    if xerr is not None:  # the range over interleaved timing rounds
        for i in idx:
            if xerr[i]:
                low, high = xerr[i]
                ax.errorbar([xs[i]], [ys[i]], xerr=[[max(0.0, xs[i] - low)], [max(0.0, high - xs[i])]],
                            fmt="none", ecolor="tab:gray", elinewidth=1, capsize=3, zorder=2)
    if rest:
        ax.scatter([xs[i] for i in rest], [ys[i] for i in rest], s=40, facecolors="none",
                   edgecolors="tab:gray", label="dominated", zorder=3)
    if front:
        # Markers only: a line between two measured models would suggest trade-offs nobody measured.
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=50, color="tab:blue",
                   label="Pareto front (not dominated)", zorder=4)
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
    shown = [ys[i] for i in idx]
    if shown and max(shown) - min(shown) < 2.0:  # no zoom that makes 0.03 pp look like a cliff
        middle = (max(shown) + min(shown)) / 2
        ax.set_ylim(middle - 1.5, middle + 1.5)
    if idx:
        ax.legend(loc="lower right", fontsize=8)


def deployed_bytes(row: dict) -> tuple[float | None, bool]:
    """(MB of the artifact a row ships, whether it is the packed file): a ternary row ships its packed 2-bit
    file, the rest their ONNX file."""
    if row.get("packed_bytes"):
        return row["packed_bytes"] / 1e6, True
    return (row["onnx_bytes"] / 1e6 if row.get("onnx_bytes") else None), False


def _latency_series(rows: list[dict], batch: str) -> tuple[list, list]:
    values, ranges = [], []
    for row in rows:
        lat = (row.get("latency_ms") or {}).get(batch) or {}
        values.append(lat.get("p50"))
        ranges.append(lat.get("p50_range"))
    return values, ranges


def write_pareto_plot(path: str | Path, report: dict) -> Path:
    """Draw report.png for a report dict (report.json's shape) and write it atomically to `path`:
    top-1 against batch-1 latency (the edge number), against the largest batch's latency, and against the
    size of what each row ships."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["stages"]
    names = point_names(rows)
    acc = [row.get("top1") for row in rows]
    batches = sorted({b for row in rows for b in (row.get("latency_ms") or {})}, key=int)
    panels_lat = ([batches[0]] + ([batches[-1]] if len(batches) > 1 else [])) if batches else []
    shipped = [deployed_bytes(row) for row in rows]
    size = [s for s, _ in shipped]
    packed = {names[i] for i, (_, is_packed) in enumerate(shipped) if is_packed}
    sizes = [s for s in size if s]
    log_size = bool(sizes) and max(sizes) / min(sizes) > 10

    fig = Figure(figsize=(6 * (len(panels_lat) + 1), 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels_lat) + 1, squeeze=False)[0]
    for ax, batch in zip(axes, panels_lat):
        values, ranges = _latency_series(rows, batch)
        _panel(ax, values, acc, names, f"onnxruntime latency p50 at batch {batch} (ms)", xerr=ranges)
        ax.set_title(f"accuracy vs latency, batch {batch}" + (" (edge)" if batch == "1" else ""))
    if not panels_lat:
        axes[0].set_title("no latency measured")
    size_label = "shipped file size (MB" + (", log scale" if log_size else "") + ")"
    _panel(axes[-1], size, acc, names, size_label, log=log_size)
    axes[-1].set_title("accuracy vs shipped size" + (f"\n(packed 2-bit file: {', '.join(sorted(packed))}; ONNX: "
                                                     f"the rest)" if packed else " (ONNX)"), fontsize=10)
    fig.suptitle(f"cifarpress {report['recipe']}: accuracy / cost\n{machine_title(report)}")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
