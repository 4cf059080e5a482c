"""Side-by-side comparison of every variant against the reference (usually the teacher)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonsai.onnx_utils import measure_latency_paired, session

COLUMNS = [
    # (key, header, format)
    ("stage", "stage", "{}"),
    ("kind", "kind", "{}"),
    ("accuracy", "acc %", "{:.2f}"),
    ("accuracy_delta", "Δacc pts", "{:+.2f}"),
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
    threads: int = 1,
    rounds: int = 10,
    per_round: int = 50,
) -> list[dict]:
    """One row per variant. Latency is re-measured for all variants in alternating rounds in this
    process, so speedups are ratios of numbers taken under the same machine load."""
    ref = next(v for v in variants if v.stage == reference)
    sessions = {v.stage: session(v.latency_model, threads) for v in variants}
    paired = measure_latency_paired(sessions, x1, rounds=rounds, per_round=per_round)
    rows = []
    for v in variants:
        m = {**v.metrics, **paired[v.stage]}
        row = {"stage": v.stage, "kind": v.kind, **m}
        row["accuracy_delta"] = m["accuracy"] - ref.metrics["accuracy"]
        row["agreement"] = 100 * float((v.predictions == ref.predictions).mean())
        row["speedup"] = paired[reference]["latency_p50_ms"] / m["latency_p50_ms"]
        row["size_ratio"] = ref.metrics["bytes"] / m["bytes"]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table (readable in a terminal and in the MLflow UI)."""
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        cells.append([f.format(r[k]) if k in r else "" for k, _, f in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for j, row in enumerate(cells):
        lines.append(
            "| "
            + " | ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def pareto_plot(rows: list[dict], path: Path) -> Path:
    """Accuracy against latency, marker area by bytes; the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lat = np.array([r["latency_p50_ms"] for r in rows])
    acc = np.array([r["accuracy"] for r in rows])
    size = np.array([r["bytes"] for r in rows])
    area = 30 + 400 * np.sqrt(size / size.max())
    ax.scatter(lat, acc, s=area, alpha=0.6)
    for r, x, y in zip(rows, lat, acc, strict=True):
        ax.annotate(
            f"{r['stage']}\n{r['bytes'] / 1024:,.0f} KiB",
            (x, y),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    order = np.argsort(lat)
    front, best = [], -np.inf
    for i in order:  # faster-first: a point is on the front if it beats every faster one
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    ax.plot(lat[front], acc[front], "--", color="gray", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("onnxruntime latency p50, batch 1 (ms, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs latency (marker area ~ model bytes)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
