"""Transient faults: the MLflow server restarted in the middle of a run, and a worker that dies
in the middle of a deployed run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.servers.conftest import STAGES, TINY, metrics, tags
from tests.servers.procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.servers]


def _wait(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended ({proc.returncode}) before {what}")
        with contextlib.suppress(Exception):  # the server may be restarting
            if predicate():
                return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_mlflow_server_starts_no_job_workers(servers):
    """flows/mlflow_server.py turns MLflow's job execution off: with it on, the server started
    a job runner and seven Huey consumers (~250 MB each) that polled for the whole session."""
    procs = psutil.Process(servers.mlflow.proc.pid).children(recursive=True)
    cmdlines = [" ".join(p.cmdline()) for p in procs if p.is_running()]
    assert cmdlines, "the MLflow server has no worker processes at all"  # uvicorn's, at least
    assert not [c for c in cmdlines if "huey" in c or "mlflow.server.jobs" in c], cmdlines


def test_restarting_the_mlflow_server_mid_run_loses_nothing(servers):
    """MLflow's own HTTP retries are switched off (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0), so what
    carries the run through the restart is Bonsai's retry wrapper (tasks/retry.py)."""
    exp = f"restart-{uuid.uuid4().hex[:8]}"
    store = servers.store()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.compress", *TINY, "tracking=server",
         f"tracking.store_dir={store}", f"tracking.experiment={exp}"],
        cwd=ROOT,
        env=servers.env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", BONSAI_TRACKING_RETRY_SECONDS="180"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        # As soon as the pipeline's parent run exists, the server goes away and comes back.
        _wait(
            lambda: servers.runs(exp, "tags.`bonsai.role` = 'pipeline'"),
            180,
            "the parent run",
            proc,
        )
        servers.mlflow.stop()
        time.sleep(3)
        down = servers.mlflow.start()
        out, _ = proc.communicate(timeout=420)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert "retry 1 in" in out  # a tracking call really met the outage and was retried
    print(f"\nMLflow server restarted (new one ready in {down:.1f} s); the run retried through it")

    parents = servers.runs(exp, "tags.`bonsai.role` = 'pipeline'")
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    children = servers.runs(exp, f"tags.`mlflow.parentRunId` = '{parents[0]['info']['run_id']}'")
    assert sorted(tags(c)["bonsai.stage"] for c in children) == sorted(STAGES)  # none twice
    for c in children:
        assert c["info"]["status"] == "FINISHED"
        assert {"accuracy", "bytes", "latency_p50_ms", "speedup"} <= set(metrics(c))
        assert tags(c)["bonsai.model_uri"].startswith("models:/")
    ready = {m["info"]["source_run_id"] for m in servers.logged_models(exp)
             if m["info"]["status"] == "LOGGED_MODEL_READY"}  # fmt: skip
    assert {c["info"]["run_id"] for c in children} <= ready
    assert {"teacher.accuracy", "int8.bytes"} <= set(metrics(parents[0]))  # the comparison


# Short teacher, a student long enough to kill the worker in the middle of it.
SLOW = [
    "data=synthetic", "data.num_train=2048", "teacher=cnn_large", "student=cnn_tiny",
    "pipeline.stages.teacher.epochs=2", "pipeline.stages.teacher.amp=false",
    "pipeline.stages.student.epochs=40", "runtime.progress=false", "eval.repeats=20",
    "eval.compare_rounds=2", "eval.footprint=false",
]  # fmt: skip


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and every process under it at once: the machine is gone."""
    parent = psutil.Process(proc.pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


def test_a_worker_that_dies_mid_run_leaves_a_crashed_run_and_the_rerun_resumes(servers, workers):
    exp = f"crash-{uuid.uuid4().hex[:8]}"
    store = servers.store()
    overrides = [
        *SLOW,
        "tracking=server",
        f"tracking.store_dir={store}",
        f"tracking.experiment={exp}",
    ]
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    reg = servers.run(
        ["-m", "flows.serve", "--pool", pool, "--name", "slow", "--crash-after", "60", "--", *overrides],
        timeout=120,
    )  # fmt: skip
    assert reg.returncode == 0, reg.stderr

    worker = workers(servers, pool)
    first = servers.trigger("bonsai-compress/slow")
    _wait(
        lambda: (
            list((store / "stages").glob(".tmp-student-*"))
            and servers.runs(exp, "tags.`bonsai.stage` = 'student'")
        ),
        300,
        "the student stage to start",
        worker,
    )
    time.sleep(1)
    assert servers.flow_run(first)["state"]["type"] == "RUNNING"
    _kill_tree(worker)

    t0 = time.monotonic()
    fr = servers.wait_flow_run(first, timeout=240, states=("CRASHED",))
    assert fr["state"]["type"] == "CRASHED", fr["state"]
    print(
        f"\nworker killed; Prefect marked the flow run Crashed {time.monotonic() - t0:.0f} s later"
    )

    workers(servers, pool)
    # Re-run with a shorter student, as its owner allows by default (`pipeline.stages.*.epochs`):
    # the killed student is built again either way, and the teacher's key is unchanged.
    second = servers.trigger(
        "bonsai-compress/slow", {"overrides": [*overrides, "pipeline.stages.student.epochs=2"]}
    )
    fr = servers.wait_flow_run(second, timeout=420)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]

    parents = {p["info"]["status"]: p for p in servers.runs(exp, "tags.`bonsai.role` = 'pipeline'")}
    assert set(parents) == {"KILLED", "FINISHED"}  # the dead one reaped by the re-run
    rerun = servers.runs(
        exp, f"tags.`mlflow.parentRunId` = '{parents['FINISHED']['info']['run_id']}'"
    )
    cached = {tags(c)["bonsai.stage"]: tags(c)["bonsai.cached"] for c in rerun}
    assert cached == {"teacher": "true", "student": "false", "onnx": "false", "int8": "false"}
    # Nothing left RUNNING, and the teacher was computed once across both runs.
    every = servers.runs(exp)
    assert "RUNNING" not in {r["info"]["status"] for r in every}
    built = [tags(r).get("bonsai.stage") for r in every
             if r["info"]["status"] == "FINISHED" and tags(r).get("bonsai.cached") == "false"]  # fmt: skip
    assert built.count("teacher") == 1
