"""The tests' copy of a migrated MLflow database (tests/mlflow_template.py) gives the database
MLflow's own migrations give, and leaves any database that is not empty to MLflow."""

import sqlite3
import types

import pytest
from sqlalchemy import create_engine

from tests.mlflow_template import _patch


def _schema(db):
    with sqlite3.connect(db) as con:
        tables = con.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
        rev = con.execute("SELECT version_num FROM alembic_version").fetchall()
    return tables, rev


def test_a_new_store_from_the_template_is_the_one_mlflow_migrates(tmp_path):
    from mlflow.store.db import utils
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from tasks.mlflow_backend import _db_state

    real = getattr(utils._initialize_tables, "migrate", utils._initialize_tables)
    calls = []
    fake = types.SimpleNamespace(_initialize_tables=lambda e: (calls.append(e), real(e))[1])
    _patch(fake, tmp_path / "template.db")

    engines = [create_engine(f"sqlite:///{tmp_path / n}") for n in ("a.db", "b.db", "c.db")]
    for e in engines:
        fake._initialize_tables(e)
        e.dispose()
    assert calls == engines[:1]  # MLflow migrated the first one only
    assert (tmp_path / "template.db").exists()
    a, b = _schema(tmp_path / "a.db"), _schema(tmp_path / "b.db")
    assert len(a[0]) > 20 and a[1]
    assert a == b == _schema(tmp_path / "c.db")
    # MLflow opens it as one of its own and adds its default experiment; Bonsai reads it as whole.
    store = SqlAlchemyStore(f"sqlite:///{tmp_path / 'b.db'}", (tmp_path / "art").as_uri())
    assert [x.name for x in store.search_experiments()] == ["Default"]
    assert _db_state(tmp_path / "b.db")[0] == "ok"


def test_a_database_that_is_not_empty_is_left_to_mlflow(tmp_path):
    seen = []
    fake = types.SimpleNamespace(_initialize_tables=seen.append)
    _patch(fake, tmp_path / "template.db")
    (tmp_path / "template.db").write_bytes(b"")  # a template exists: it must not be used here
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (x)")
    engine = create_engine(f"sqlite:///{db}")
    fake._initialize_tables(engine)
    assert seen == [engine]
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_databases_are_left_to_mlflow(tmp_path, url):
    seen = []
    fake = types.SimpleNamespace(_initialize_tables=seen.append)
    _patch(fake, tmp_path / "template.db")
    engine = create_engine(url)
    fake._initialize_tables(engine)
    assert seen == [engine] and not (tmp_path / "template.db").exists()
