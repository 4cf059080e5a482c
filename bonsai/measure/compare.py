"""Side-by-side comparison of every variant against the reference (usually the teacher)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonsai.formats import open_session
from bonsai.measure import latency
from bonsai.measure.latency import measure_latency_paired

COLUMNS = [
    # (key, header, format)
    ("stage", "stage", "{}"),
    ("kind", "kind", "{}"),
    # Accuracy on the test split (what the table reports) and its change against the
    # reference; `val %`: on the validation split, what gates and promotion decided by.
    ("accuracy", "acc %", "{:.2f}"),
    ("accuracy_delta", "Δacc pts", "{:+.2f}"),
    ("val_accuracy", "val %", "{:.2f}"),
    ("agreement", "agree %", "{:.1f}"),
    ("params", "params", "{:,.0f}"),
    ("macs", "MACs", "{:,.0f}"),
    ("bytes", "bytes", "{:,.0f}"),
    ("zipped_bytes", "zipped", "{:,.0f}"),
    ("sparsity", "sparse %", "{:.1f}"),
    ("latency_p50_ms", "p50 ms", "{:.4f}"),
    ("latency_p90_ms", "p90 ms", "{:.4f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("size_ratio", "smaller", "{:.1f}x"),
    # Deployable footprint: the runtime library it needs (installed size), and the peak memory
    # of one batch-1 inference in a fresh process (bonsai/measure/footprint.py).
    ("runtime_mb", "runtime MB", "{:.1f}"),
    ("peak_rss_mb", "RSS MB", "{:.1f}"),
    # Multi-task variants: the separate single-task models they replace (one per head, same
    # backbone and format), their bytes and batch-1 latencies summed.
    ("single_task_bytes", "1-task models bytes", "{:,.0f}"),
    ("single_task_latency_ms", "1-task models ms", "{:.4f}"),
    # Quantized variants: speed against their own fp32 parent (the stage's speed guard), and
    # the guard's verdict; FAIL marks a variant not `min_speedup` times faster than its parent.
    ("speedup_vs_parent", "vs parent", "{:.2f}x"),
    ("guard", "guard", "{}"),
    # Searched int8 (quantize.static search:): the candidate settings its stage tried.
    ("search_candidates", "tried", "{:.0f}"),
]


@dataclass
class Variant:
    stage: str
    kind: str
    metrics: dict[str, float]
    predictions: np.ndarray
    latency_model: Path


def compare(
    variants: list[Variant],
    reference: str,
    x1: np.ndarray,
    *,
    threads: int = latency.THREADS,
    rounds: int = latency.ROUNDS,
    per_round: int = latency.PER_ROUND,
) -> list[dict]:
    """One row per variant. Latency is re-measured for all variants in alternating rounds in this
    process, so speedups are ratios of numbers taken under the same machine load."""
    ref = next(v for v in variants if v.stage == reference)
    # Variants that cannot run here (Core ML) have no latency model and no accuracy.
    runnable = [v for v in variants if "accuracy" in v.metrics]
    sessions = {v.stage: open_session(v.latency_model, threads) for v in runnable}
    paired = measure_latency_paired(sessions, x1, rounds=rounds, per_round=per_round)
    rows = []
    for v in variants:
        m = {**v.metrics, **paired.get(v.stage, {})}
        row = {"stage": v.stage, "kind": v.kind, **m}
        if v.stage in paired and reference in paired:
            row["accuracy_delta"] = m["accuracy"] - ref.metrics["accuracy"]
            if "val_accuracy" in m and "val_accuracy" in ref.metrics:  # promotion's drop bound
                row["val_accuracy_delta"] = m["val_accuracy"] - ref.metrics["val_accuracy"]
            row["agreement"] = 100 * float((v.predictions == ref.predictions).mean())
            row["speedup"] = paired[reference]["latency_p50_ms"] / m["latency_p50_ms"]
        row["size_ratio"] = ref.metrics["bytes"] / m["bytes"]
        for key in ("runtime", "peak_rss"):
            if f"{key}_bytes" in m:
                row[f"{key}_mb"] = m[f"{key}_bytes"] / 1e6
        if "speed_guard_ok" in m:
            row["guard"] = "ok" if m["speed_guard_ok"] >= 1 else "FAIL"
        rows.append(row)
    return rows


OPTIONAL = {
    "single_task_bytes",
    "single_task_latency_ms",
    "search_candidates",
}  # shown when some row has them


def table_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """COLUMNS, with one accuracy column per head after `acc %` for multi-task variants, and
    without the optional columns no row fills."""
    heads = sorted(
        {k for r in rows for k in r if k.startswith("accuracy_")}
        - {"accuracy_delta", "accuracy_drop"},
        key=lambda k: min(list(r).index(k) for r in rows if k in r),
    )
    out = []
    for col in COLUMNS:
        if col[0] in OPTIONAL and not any(col[0] in r for r in rows):
            continue
        out.append(col)
        if col[0] == "accuracy":
            out += [(k, f"{k[len('accuracy_') :]} %", "{:.2f}") for k in heads]
    return out


def format_table(rows: list[dict], columns: list[tuple[str, str, str]] | None = None) -> str:
    """A Markdown table (readable in a terminal and in the MLflow UI); text columns first."""
    columns = columns or table_columns(rows)
    text = sum(1 for _, _, f in columns if f == "{}")
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([f.format(r[k]) if k in r else "" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append(
            "| "
            + " | ".join(
                c.ljust(w) if i < text else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def pareto_front(lat: np.ndarray, acc: np.ndarray) -> list[int]:
    """Indices of the variants no other variant beats on both latency (lower) and accuracy
    (higher), fastest first."""
    front, best = [], -np.inf
    for i in np.lexsort((-acc, lat)):  # by latency, ties: most accurate first
        if acc[i] > best:
            front.append(int(i))
            best = acc[i]
    return front


def _human_bytes(n: float) -> str:
    for unit, div in (("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n:,.0f} B"


def _place_labels(ax, points, labels) -> None:
    """Put each label next to its point where it overlaps no other label, no marker and stays
    inside the axes (greedy over 16 candidate offsets, nearest first)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    taken = []
    for x, y in points:  # markers, in display pixels
        px, py = ax.transData.transform((x, y))
        taken.append((px - 9, py - 9, px + 9, py + 9))
    offsets = [
        (dx * r, dy * r)
        for r in (10, 26)
        for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
    ]

    def overlaps(b):
        return any(not (b[2] < t[0] or b[0] > t[2] or b[3] < t[1] or b[1] > t[3]) for t in taken)

    for (x, y), text in zip(points, labels, strict=True):
        chosen = None
        for dx, dy in offsets:
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=8,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if abs(dx) > 10 else None,
            )
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = (
                bb.x0 >= axes_box.x0
                and bb.x1 <= axes_box.x1
                and bb.y0 >= axes_box.y0
                and bb.y1 <= axes_box.y1
            )
            if inside and not overlaps(box):
                chosen = box
                break
            ann.remove()
        if chosen is None:  # nowhere free: the first choice, so no label is lost
            dx, dy = offsets[0]
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8)
            bb = ann.get_window_extent(renderer)
            chosen = (bb.x0, bb.y0, bb.x1, bb.y1)
        taken.append(chosen)


FRONT_LABEL = "Pareto front: nothing is both\nfaster and more accurate"


def pareto_plot(rows: list[dict], path: Path, title: str = "") -> Path:
    """`pareto_figure` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_figure(rows: list[dict], title: str = ""):
    """Accuracy against measured latency: one marker per variant (area ~ model bytes; an open
    circle for a torch model, a filled square for ONNX), each labelled with its stage and size,
    the Pareto front as a staircase, the legend outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in rows if "latency_p50_ms" in r and "accuracy" in r]  # not Core ML
    lat = np.array([r["latency_p50_ms"] for r in rows], dtype=float)
    acc = np.array([r["accuracy"] for r in rows], dtype=float)
    size = np.array([r["bytes"] for r in rows], dtype=float)
    area = 40 + 360 * np.sqrt(size / size.max())
    front = pareto_front(lat, acc)

    fig, ax = plt.subplots(figsize=(9, 5.2))
    colors = plt.get_cmap("tab10")
    for i in np.argsort(-area):  # big markers first, so small ones stay visible on top
        onnx = rows[i].get("kind", "").startswith(("export", "quantize"))
        color = colors(int(i) % 10)
        ax.scatter(
            lat[i],
            acc[i],
            s=area[i],
            marker="s" if onnx else "o",
            # torch: an open circle, so an ONNX export at the same spot does not hide it
            facecolors=color if onnx else "none",
            edgecolors=color,
            linewidths=1.0 if onnx else 2.2,
            alpha=0.8,
            zorder=3,
        )
    # Room for labels: 40% more on each side of the latency range (log scale), 25% on accuracy.
    lo, hi = np.log10(lat.min()), np.log10(lat.max())
    pad = max(0.4 * (hi - lo), 0.15)
    ax.set_xscale("log")
    x0, x1 = 10 ** (lo - pad), 10 ** (hi + pad)
    span = max(acc.max() - acc.min(), 1.0)
    y0, y1 = acc.min() - 0.25 * span, acc.max() + 0.25 * span
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    # The front as a staircase: up from the bottom to the fastest front variant, right to the
    # next one's latency, up to its accuracy, ..., then right to the edge.
    fx, fy = [lat[front[0]]], [y0]
    for a, b in zip(front, [*front[1:], None], strict=True):
        fx += [lat[a], x1 if b is None else lat[b]]
        fy += [acc[a], acc[a]]
    ax.plot(fx, fy, "--", color="0.35", lw=1.2, zorder=2)
    ax.grid(True, which="both", alpha=0.25)
    ax.set_xlabel("latency p50 at batch 1 (ms, log scale; onnxruntime, or LiteRT for .tflite)")
    from matplotlib.ticker import FuncFormatter  # 0.2, 0.5, 1 rather than 2x10^-1

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
    )
    multi = any(k.startswith("accuracy_") and k not in ("accuracy_delta", "accuracy_drop")
                for r in rows for k in r)  # fmt: skip
    ax.set_ylabel("test accuracy (%, mean over heads)" if multi else "test accuracy (%)")
    title = title or "Accuracy vs latency of every variant"
    if len(title) > 90:  # a run name with long overrides ran off the left edge of the figure
        title = title[:89] + "…"
    ax.set_title(title, fontsize=10)
    labels = [f"{r['stage']}\n{_human_bytes(r['bytes'])}" for r in rows]
    legend = [
        Line2D([], [], marker="o", ls="", mfc="none", mec="0.4", mew=2, label="torch model", ms=8),
        Line2D([], [], marker="s", ls="", color="0.5", label="exported file (ONNX, LiteRT)", ms=8),
        Line2D([], [], ls="--", color="0.35", label=FRONT_LABEL),
    ]
    ax.legend(
        handles=legend, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False
    )
    ax.text(
        1.02, 0.02, "marker area ~ model bytes", transform=ax.transAxes, fontsize=8, color="0.3"
    )
    fig.tight_layout()
    _place_labels(ax, list(zip(lat, acc, strict=True)), labels)
    return fig
