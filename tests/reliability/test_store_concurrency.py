"""Several commands at once on one store: a new store is created once (MLflow's migrations never
run twice at once), a half-migrated one is repaired or refused, and a stage that two commands
need is built by one of them while the other waits and reuses it. Each race is repeated."""

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from bonsai.store import StoreError
from tests.helpers import start_module, store_runs

TRIALS = 5


def _warm():
    import bonsai.build  # noqa: F401  (torch imported before the race)
    import tasks.mlflow_backend  # noqa: F401
    import tasks.stages  # noqa: F401  (mlflow, prefect too)
    from tests import export_cache

    export_cache.install()  # the trials export the same teacher: torch's exporter once


def _init(store: str) -> str:
    from tasks.mlflow_backend import init_store

    return init_store(None, store, "bonsai")[1]


def _build(store: str) -> tuple[str, bool]:
    """One command's view of one stage: take the key's lock, reuse or build, report which."""
    from bonsai.build import run_stage
    from bonsai.data import load_data

    data = load_data({"name": "synthetic", "num_train": 256})
    params = {"model": {"name": "cnn", "width": 8}, "epochs": 2}
    settings = {"threads": 1, "warmup": 1, "repeats": 10, "batch_size": 256}
    b = run_stage(store, "teacher", "train", params, data, eval_cfg=settings, log=lambda m: None)
    assert b.record is not None
    return b.record.build_id, b.built


@pytest.fixture(scope="module")
def pool():
    """Three warm worker processes: the race is between them, not between their imports."""
    with mp.get_context("spawn").Pool(3, initializer=_warm) as p:
        yield p


def test_three_commands_creating_one_new_store_race_safely(pool, tmp_path):
    for trial in range(TRIALS):
        store = tmp_path / f"trial{trial}" / "mlruns"
        ids = pool.map(_init, [str(store)] * 3, chunksize=1)
        assert len(set(ids)) == 1, ids
        with sqlite3.connect(store / "mlflow.db") as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master")]
            assert not [t for t in tables if t.startswith("_alembic_tmp")]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{store}/mlflow.db")
        run = client.create_run(ids[0])  # the schema is whole: a run can be written
        client.set_terminated(run.info.run_id)


def test_two_commands_needing_one_stage_build_it_once(pool, tmp_path):
    for trial in range(TRIALS):
        store = tmp_path / f"trial{trial}"
        results = pool.map(_build, [str(store)] * 3, chunksize=1)
        assert len({build_id for build_id, _ in results}) == 1, results
        assert sorted(b for _, b in results) == [False, False, True], results


def _half_migrated(store: Path, with_run: bool) -> Path:
    from tasks.mlflow_backend import init_store

    _, exp = init_store(None, str(store), "bonsai")
    db = store / "mlflow.db"
    if with_run:
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{db}").create_run(exp)
    with sqlite3.connect(db) as con:  # what an interrupted alembic batch migration leaves
        con.execute("CREATE TABLE _alembic_tmp_runs (run_uuid VARCHAR(32))")
    return db


def test_a_half_migrated_empty_store_is_created_again(tmp_path):
    from tasks.mlflow_backend import init_store

    db = _half_migrated(tmp_path / "s", with_run=False)
    init_store(None, str(tmp_path / "s"), "bonsai")
    assert list(tmp_path.glob("s/mlflow.db.half-migrated-*"))
    with sqlite3.connect(db) as con:
        assert not con.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp%'"
        ).fetchall()


def test_a_half_migrated_store_with_runs_is_refused_with_the_repair_command(tmp_path):
    from tasks.mlflow_backend import init_store

    db = _half_migrated(tmp_path / "s", with_run=True)
    before = db.read_bytes()
    with pytest.raises(StoreError, match=r"half-migrated.*1 run.*mlflow db upgrade sqlite:///"):
        init_store(None, str(tmp_path / "s"), "bonsai")
    assert db.read_bytes() == before  # nothing touched


@pytest.mark.slow
def test_three_identical_commands_at_once_compute_each_stage_once(tmp_path):
    from tasks.mlflow_backend import init_store

    store = tmp_path / "mlruns"
    init_store(None, str(store), "bonsai")  # an existing store, as in the report
    args = ["data=synthetic", "debug=fast", "teacher=cnn_large", f"tracking.store_dir={store}"]
    procs = [start_module("flows.compress", args) for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-3000:] for o in outs)
    runs = store_runs(store)
    parents = [r for r in runs if r.data.tags.get("bonsai.role") == "pipeline"]
    assert [r.info.status for r in parents] == ["FINISHED"] * 3
    stages = [r for r in runs if r.data.tags.get("bonsai.role") == "stage"]
    for name in ("teacher", "student", "onnx", "int8"):
        mine = [r for r in stages if r.data.tags["bonsai.stage"] == name]
        assert len(mine) == 3 and {r.info.status for r in mine} == {"FINISHED"}
        computed = [r for r in mine if r.data.tags["bonsai.cached"] == "false"]
        assert len(computed) == 1, (name, [r.data.tags["bonsai.cached"] for r in mine])
    assert len(list((store / "stages").glob("teacher-*"))) == 1
