"""Promote the best variant of existing runs under a policy, as its own Prefect flow and MLflow run.

python -m flows.promote promote=edge_small                      # the newest pipeline run
python -m flows.promote promote=server_fast promote.scope=experiment
python -m flows.promote promote=edge_small promote.dry_run=true # print every verdict, change nothing

The same policy runs at the end of a pipeline with `python -m flows.compress promote=edge_small`.
Exit 0: a version was registered (or the winner already is the champion); 1: no variant
satisfies the policy (nothing changed); 2: bad input (nothing ran).
"""

from __future__ import annotations

from typing import Any

import flows  # noqa: F401  (environment defaults, before prefect is imported)
from flows.cli import run_app, start_prefect_server, stop_on_signals


def promote_runs(config: dict[str, Any]) -> dict[str, Any]:
    """Validate, check the store, then run the promotion flow; returns the promotion result."""
    from prefect import flow

    from bonsai.config import validate_config
    from bonsai.errors import ConfigError
    from tasks.mlflow_backend import check_store

    cfg, _ = validate_config(config)
    if cfg.promote is None:
        raise ConfigError(
            "choose a promotion policy: promote=<policy> (conf/promote/: edge_small, "
            "server_fast, or your own file there)"
        )
    check_store(cfg.tracking.uri, cfg.tracking.store_dir)
    policy, eval_cfg = cfg.promote.model_dump(mode="json"), cfg.eval.model_dump()

    def promote_flow(policy: dict[str, Any]) -> dict[str, Any]:
        from pathlib import Path

        from tasks.mlflow_backend import init_store
        from tasks.promote import promote

        with stop_on_signals():
            _, exp_id = init_store(
                cfg.tracking.uri, cfg.tracking.store_dir, cfg.tracking.experiment
            )
            store_dir = str(Path(cfg.tracking.store_dir).resolve())
            return promote(policy, exp_id, None, store_dir, eval_cfg)

    start_prefect_server()
    return flow(promote_flow, name="promote", validate_parameters=False)(policy)  # type: ignore[call-overload]


def _job(config: dict[str, Any], overrides: list[str]) -> str:
    from bonsai.errors import NothingToPromote

    result = promote_runs(config)
    if result["decision"] == "none":
        print(result["report"])
        raise NothingToPromote(result["reason"])
    return result["report"]


def main() -> None:
    run_app(_job)


if __name__ == "__main__":
    main()
