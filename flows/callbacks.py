"""Hydra callbacks. `InitStore` creates the MLflow store once, before a multirun fans out:
several processes creating one new SQLite store at once corrupt it (STACK_NOTES)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class InitStore(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import flows  # noqa: F401  (environment defaults)
        from tasks import tracking

        t = OmegaConf.to_container(config.tracking, resolve=True)
        tracking.init_store(t.get("uri"), t["store_dir"], t["experiment"])
