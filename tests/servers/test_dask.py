"""Scale-out: `runtime.task_runner=dask` runs the stages in the worker processes of a Dask cluster
(here a local one, started by the command), with workers x torch threads <= cores."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from tests.servers.procs import ROOT

pytestmark = pytest.mark.slow


def test_independent_branches_run_in_dask_worker_processes(tmp_path):
    store = tmp_path / "mlruns"
    env_cmd = [
        sys.executable, "-m", "flows.compress", "pipeline=two_students", "data=synthetic",
        "debug=fast", "teacher=cnn_large", "runtime.task_runner=dask", "runtime.cpus=2",
        f"tracking.store_dir={store}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # temporary server
    out = subprocess.run(env_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "Creating a new Dask cluster" in text
    # One temporary Prefect server, shared with the worker processes (not one per process).
    assert text.count("Starting temporary server") == 1

    with sqlite3.connect(store / "mlflow.db") as con:
        rows = con.execute(
            "SELECT r.run_uuid, t1.value, t2.value FROM runs r "
            "JOIN tags t1 ON t1.run_uuid = r.run_uuid AND t1.key = 'bonsai.role' "
            "JOIN tags t2 ON t2.run_uuid = r.run_uuid AND t2.key = 'bonsai.pid'"
        ).fetchall()
        threads = con.execute(
            "SELECT value FROM params WHERE key = 'runtime.torch_threads'"
        ).fetchall()
        statuses = {s for (s,) in con.execute("SELECT status FROM runs")}
    parent_pids = {pid for _, role, pid in rows if role == "pipeline"}
    stage_pids = {pid for _, role, pid in rows if role == "stage"}
    assert len(parent_pids) == 1
    assert len([1 for _, role, _ in rows if role == "stage"]) == 7  # teacher + 2 x 3 stages
    # Every stage ran outside the flow's process, in at most 2 worker processes (the widest
    # level of the graph), each with cpus // workers = 1 torch thread: 2 x 1 <= 2 cores.
    assert not stage_pids & parent_pids
    assert 1 <= len(stage_pids) <= 2
    assert {t for (t,) in threads} == {"1"}
    assert statuses == {"FINISHED"}
