"""Tests only: a new SQLite MLflow database starts as a copy of one that MLflow itself created
and migrated, instead of running MLflow's Alembic migrations again (2.6 s per new store on the
2-core EPYC, in a process that has run them once; the suite creates a store in most of its
commands).

`install(template)` wraps `mlflow.store.db.utils._initialize_tables` (what MLflow calls, under
its file lock, when a database has no tables) in this process, now or when MLflow is imported:
the first new SQLite database is created by MLflow as usual, then saved to `template` (`VACUUM
INTO`, before MLflow adds its default experiment: nothing in it names a path); every later one is
filled from that copy with SQLite's backup API. MLflow then goes on as with a database it just
migrated (default experiment, schema check). Other databases (PostgreSQL, `:memory:`) and fresh
interpreters are untouched: the tests that interrupt a creation or check the migrations
themselves run their commands as fresh processes (tests/helpers.py start_cli), and
`BONSAI_TEST_MLFLOW_TEMPLATE=0` turns the copy off everywhere.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

TARGET = "mlflow.store.db.utils"


def enabled() -> bool:
    return os.environ.get("BONSAI_TEST_MLFLOW_TEMPLATE", "1") != "0"


def install(template: Path) -> None:
    if not enabled():
        return
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET], template)
    else:
        sys.meta_path.insert(0, _Finder(template))


class _Finder(importlib.abc.MetaPathFinder):
    """Patches TARGET right after it executes (the first import of it in this process)."""

    def __init__(self, template: Path):
        self.template = template

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, template = spec.loader, self.template
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _patch(module, template)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch(utils: ModuleType, template: Path) -> None:
    migrate = utils._initialize_tables
    if hasattr(migrate, "migrate"):  # patched already
        return

    def _initialize_tables(engine) -> None:  # type: ignore[no-untyped-def]
        db = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        if not db or db == ":memory:" or db.startswith("file:"):
            return migrate(engine)
        with contextlib.closing(sqlite3.connect(db)) as con:
            empty = not con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        if not empty:  # whatever is in it, MLflow decides (a backup would replace it)
            return migrate(engine)
        if template.exists():
            raw = engine.raw_connection()
            try:
                with contextlib.closing(sqlite3.connect(template)) as src:
                    src.backup(raw.driver_connection)
            finally:
                raw.close()
            return None
        migrate(engine)
        tmp = template.with_name(f".{template.name}.{os.getpid()}")
        with contextlib.closing(sqlite3.connect(db)) as con:
            con.execute("VACUUM INTO ?", (str(tmp),))
        os.replace(tmp, template)  # atomic: a concurrent creator replaces it with the same
        return None

    _initialize_tables.migrate = migrate  # type: ignore[attr-defined]
    utils._initialize_tables = _initialize_tables
