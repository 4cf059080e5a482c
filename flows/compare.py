"""Every variant of every pipeline run in the experiment (or of chosen runs), as one table and
one Pareto front, logged (CSV, Markdown, PNG) on an MLflow run of its own.

python -m flows.compare                              # every finished pipeline run
python -m flows.compare compare.last=4               # the newest four (e.g. a 4-job sweep)
python -m flows.compare compare.runs=[<id>,<id>]     # chosen runs
python -m flows.compare compare.pipeline=default
"""

from __future__ import annotations

from typing import Any

import flows  # noqa: F401  (environment defaults, before prefect is imported)
from flows.cli import run_app, start_prefect_server, stop_on_signals


def compare(config: dict[str, Any]) -> dict[str, Any]:
    from prefect import flow

    from bonsai.config import validate_config
    from tasks.mlflow_backend import check_store

    cfg, _ = validate_config(config)
    check_store(cfg.tracking.uri, cfg.tracking.store_dir)

    def compare_flow(selection: dict[str, Any]) -> dict[str, Any]:
        from tasks.compare import compare_runs
        from tasks.mlflow_backend import init_store

        with stop_on_signals():
            _, exp_id = init_store(
                cfg.tracking.uri, cfg.tracking.store_dir, cfg.tracking.experiment
            )
            return compare_runs(exp_id, selection)

    f = flow(compare_flow, name="compare", validate_parameters=False)  # type: ignore[call-overload]
    start_prefect_server()
    return f(cfg.compare.model_dump())


def _job(config: dict[str, Any], overrides: list[str]) -> str:
    result = compare(config)
    return (
        f"\n{result['table']}\n\n{len(result['rows'])} variant(s) of {len(result['runs'])} "
        f"pipeline run(s); Δacc, speedup and size against each run's own reference, latencies "
        f"as each run measured them. Logged on MLflow run {result['run_id']} "
        "(comparison.csv, comparison.md, plots/pareto.png).\n"
    )


def main() -> None:
    run_app(_job)


if __name__ == "__main__":
    main()
