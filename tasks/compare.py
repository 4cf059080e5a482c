"""The Prefect task that compares every variant side by side and records it on the pipeline run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

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
) -> dict[str, Any]:
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
    with tempfile.TemporaryDirectory() as tmp:
        plot = pareto_plot(rows, Path(tmp) / "pareto.png")
        tracking.log_comparison(parent_run_id, rows, table, plot)
    for r, res in zip(rows, results, strict=True):
        tracking.log_ratios(res["run_id"], r)
    return {"rows": rows, "table": table}
