"""Hydra callbacks. `InitStore` creates the MLflow store once, before a multirun fans out:
several processes creating one new SQLite store at once corrupt it (STACK_NOTES)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class InitStore(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import flows  # noqa: F401  (environment defaults)
        from tasks.store import init_store

        t = config.tracking
        init_store(OmegaConf.select(t, "uri"), str(t.store_dir), str(t.experiment))
