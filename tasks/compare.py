"""The Prefect task that compares every variant side by side and records it on the pipeline run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact

from bonsai.data import load_data
from bonsai.measure.compare import COLUMNS, Variant, compare, format_table, pareto_plot
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
        f"Against `{reference}`; latency: batch 1 in each variant's runtime (onnxruntime; LiteRT's interpreter for LiteRT), "
        f"measured side by side; Core ML packages cannot run here. "
        f"MLflow run `{parent_run_id}` holds the Pareto plot and every variant's model.",
        key="comparison",
        description="Every variant side by side",
    )
    return {"rows": rows, "table": table}


RUN_COLUMNS = [("run", "run", "{}"), *COLUMNS]


@task(name="compare-runs")
def compare_runs(experiment_id: str, selection: dict[str, Any]) -> dict[str, Any]:
    """Every variant of the chosen pipeline runs as one table and one Pareto front, logged on
    an MLflow run of its own (role `compare`): comparison.csv, comparison.md, plots/pareto.png.

    Numbers are those each run measured (its speedups and Δacc against its own reference,
    latencies timed side by side within that run): compare runs made on one machine."""
    import csv

    from mlflow.tracking import MlflowClient

    from bonsai.errors import ConfigError
    from tasks import registry

    client = MlflowClient()
    parents = registry.pipeline_runs(client, experiment_id)
    if selection["runs"]:
        missing = set(selection["runs"]) - {p.info.run_id for p in parents}
        if missing:
            raise ConfigError(
                f"compare.runs: no finished pipeline run {sorted(missing)} in this experiment"
            )
        parents = [p for p in parents if p.info.run_id in selection["runs"]]
    if selection["pipeline"]:
        parents = [
            p for p in parents if p.data.tags.get("bonsai.pipeline") == selection["pipeline"]
        ]
    if selection["last"]:
        parents = parents[: selection["last"]]
    if not parents:
        raise ConfigError(
            "no finished pipeline run to compare (check compare.runs, compare.pipeline and "
            "tracking.experiment); run `python -m flows.compress` first"
        )
    names = {p.info.run_id: p.info.run_name or p.info.run_id[:8] for p in parents}
    stage_runs = registry._stage_runs(client, experiment_id, list(names))
    rows = []
    for r in sorted(
        stage_runs, key=lambda r: (r.data.tags["mlflow.parentRunId"], r.info.start_time)
    ):
        m = r.data.metrics
        if "accuracy" not in m:
            continue
        rows.append(
            {
                "run": names[r.data.tags["mlflow.parentRunId"]],
                "stage": r.data.tags.get(tracking.TAG_STAGE, r.info.run_name),
                "kind": r.data.params.get("kind", ""),
                **{k: v for k, v in m.items() if not k.startswith("train")},
                "latency_p50_ms": m.get("paired_latency_p50_ms", m.get("latency_p50_ms")),
                **{
                    f"{k}_mb": m[f"{k}_bytes"] / 1e6
                    for k in ("runtime", "peak_rss")
                    if f"{k}_bytes" in m
                },
            }
        )
    table = format_table(rows, RUN_COLUMNS)
    run = client.create_run(
        experiment_id,
        run_name=f"compare · {len(parents)} run(s)",
        tags={tracking.TAG_ROLE: "compare", "bonsai.compared_runs": ",".join(names)},
    )
    rid = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        labelled = [{**r, "stage": f"{r['stage']} · {r['run']}"} for r in rows]
        plot = pareto_plot(labelled, Path(tmp) / "pareto.png", f"{len(parents)} pipeline run(s)")
        with open(Path(tmp) / "comparison.csv", "w", newline="") as f:
            keys = [k for k, _, _ in RUN_COLUMNS]
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        client.log_artifact(rid, str(Path(tmp) / "comparison.csv"))
        client.log_text(rid, table + "\n", "comparison.md")
        client.log_artifact(rid, str(plot), "plots")
    client.set_terminated(rid, "FINISHED")
    return {"table": table, "rows": rows, "run_id": rid, "runs": list(names)}
