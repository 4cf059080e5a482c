"""Hydra callbacks. `InitStore` creates the MLflow store once, before a multirun fans out:
several processes creating one new SQLite store at once corrupt it (measured on the 2-core reference machine)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class InitStore(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import flows  # noqa: F401  (environment defaults)
        from tasks.mlflow_backend import init_store

        t = config.tracking
        init_store(OmegaConf.select(t, "uri"), str(t.store_dir), str(t.experiment))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """After a recipe search (Optuna sweeper): the best trial, and how to register it."""
        from pathlib import Path

        import yaml

        from bonsai.promotion import decision_metric
        from flows.search import optuna_direction

        if optuna_direction(config.hydra.sweeper) is None:
            return
        results = Path(str(config.hydra.sweep.dir)) / "optimization_results.yaml"
        if not results.is_file():  # no trial finished
            return
        best = yaml.safe_load(results.read_text())
        policy = OmegaConf.select(config, "promote.name")
        params = " ".join(f"{k}={v}" for k, v in (best.get("best_params") or {}).items())
        # What the trials returned: an accuracy objective is the validation split's.
        metric = decision_metric(str(OmegaConf.select(config, "promote.objective.metric")))
        print(
            f"bonsai: search best: {metric} = "
            f"{best.get('best_value')} with {params}\n"
            f"bonsai: register it: python -m flows.promote promote={policy} "
            f"promote.scope=experiment"
        )
