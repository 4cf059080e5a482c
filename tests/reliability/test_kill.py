"""Killing the flow mid-stage loses nothing: no run stays RUNNING, no half artifact is trusted."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.compress import compose_config, compress

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# A teacher stage long enough to be killed in the middle of (1 epoch on 4096 images ~0.5 s).
LONG = [
    "data=synthetic",
    "data.num_train=4096",
    "teacher=cnn_large",
    "pipeline.stages.teacher.epochs=300",
    "pipeline.stages.teacher.amp=false",
    "runtime.progress=false",
]


def _start(store: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.compress", *LONG, f"tracking.store_dir={store}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so the test can clean up after SIGKILL
    )


def _runs(store: Path):
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("bonsai")
    return client.search_runs([exp.experiment_id]) if exp else []


def _teacher_run_exists(store: Path) -> bool:
    """Read-only look at the store: an MlflowClient here could run migrations on a DB the flow
    process is still creating, and two processes migrating one new DB corrupt it."""
    db = store / "mlflow.db"
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute(
                "SELECT 1 FROM tags WHERE key = 'bonsai.stage' AND value = 'teacher'"
            ).fetchall()
        return bool(rows)
    except sqlite3.Error:  # tables not created yet
        return False


def _wait_for_running_teacher(proc, store: Path, timeout=150.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if _teacher_run_exists(store) and list((store / "stages").glob(".tmp-teacher-*")):
            time.sleep(2)  # well inside the stage
            return
        time.sleep(0.5)
    raise AssertionError("the teacher stage never started")


def _stage_dirs(store: Path, name: str):
    return [p for p in (store / "stages").glob(f"{name}-*") if p.is_dir()]


def test_sigterm_marks_runs_killed_and_leaves_no_artifact(tmp_path):
    store = tmp_path / "mlruns"
    proc = _start(store)
    try:
        _wait_for_running_teacher(proc, store)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert time.monotonic() - t0 < 30, "SIGTERM must not wait for the stage to finish"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout.read()
    runs = _runs(store)
    statuses = {r.data.tags.get("bonsai.stage", "pipeline"): r.info.status for r in runs}
    assert statuses == {"pipeline": "KILLED", "teacher": "KILLED"}
    teacher = next(r for r in runs if r.data.tags.get("bonsai.stage") == "teacher")
    assert "SIGTERM" in teacher.data.tags["bonsai.error"]
    assert _stage_dirs(store, "teacher") == []  # only a .tmp- directory, which nothing trusts


def test_sigkill_runs_are_reaped_and_the_rerun_recomputes(tmp_path, prefect_server):
    store = tmp_path / "mlruns"
    proc = _start(store)
    try:
        _wait_for_running_teacher(proc, store)
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned temporary Prefect server
    assert {r.info.status for r in _runs(store)} == {"RUNNING"}  # what SIGKILL leaves behind
    assert list((store / "stages").glob(".tmp-teacher-*"))
    assert _stage_dirs(store, "teacher") == []

    # The next start marks the dead process's runs KILLED and removes its temporary files.
    result = compress(
        compose_config(
            ["data=synthetic", "debug=fast", "teacher=cnn_large", f"tracking.store_dir={store}"]
        )
    )
    runs = _runs(store)
    assert "RUNNING" not in {r.info.status for r in runs}
    dead = [r for r in runs if r.info.status == "KILLED"]
    assert len(dead) == 2 and all("died" in r.data.tags["bonsai.error"] for r in dead)
    assert not list((store / "stages").glob(".tmp-*"))
    fresh = MlflowClient(result["tracking_uri"]).get_run(result["stages"]["teacher"]["run_id"])
    assert fresh.info.status == "FINISHED"
