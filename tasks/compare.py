"""The Prefect task that compares every variant side by side and records it on the pipeline run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact

from bonsai.compare import Variant, compare, format_table, pareto_plot
from bonsai.data import load_data
from tasks import tracking


@task(name="compare")
def compare_variants(
    results: list[dict[str, Any]],
    reference: str,
    data_cfg: dict[str, Any],
    eval_cfg: dict[str, Any],
    parent_run_id: str,
    parent_name: str = "",
) -> dict[str, Any]:
    """Time every variant side by side, then record the table and the Pareto plot on the
    pipeline's MLflow run and as artifacts of the Prefect flow run."""
    data = load_data(data_cfg)
    variants = [
        Variant(
            r["name"],
            r["kind"],
            r["metrics"],
            np.asarray(r["predictions"]),
            Path(r["latency_model"]),
        )
        for r in results
    ]
    rows = compare(
        variants,
        reference,
        data.test_x[:1].numpy(),
        threads=eval_cfg["threads"],
        rounds=eval_cfg["compare_rounds"],
        per_round=eval_cfg["compare_repeats"],
    )
    table = format_table(rows)
    title = f"{parent_name} · {data_cfg['name']}" if parent_name else ""
    with tempfile.TemporaryDirectory() as tmp:
        plot = pareto_plot(rows, Path(tmp) / "pareto.png", title)
        tracking.log_comparison(parent_run_id, rows, table, plot)
    for r, res in zip(rows, results, strict=True):
        tracking.log_ratios(res["run_id"], r)
    create_markdown_artifact(
        markdown=f"## {parent_name or 'Comparison'}\n\n{table}\n\n"
        f"Against `{reference}`; latency: onnxruntime, batch 1, measured side by side. "
        f"MLflow run `{parent_run_id}` holds the Pareto plot and every variant's model.",
        key="comparison",
        description="Every variant side by side",
    )
    return {"rows": rows, "table": table}
