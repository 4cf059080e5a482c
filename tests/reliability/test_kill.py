"""Killing the flow mid-stage loses nothing: no run stays RUNNING, no half artifact is trusted."""

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.compress import compose_config, compress
from tests.helpers import start_cli, store_runs, wait_inside_stage

pytestmark = pytest.mark.slow
# A teacher stage long enough to be killed in the middle of (1 epoch on 4096 images ~0.5 s).
LONG = [
    "data=synthetic",
    "data.num_train=4096",
    "teacher=cnn_large",
    "pipeline.stages.teacher.epochs=300",
    "pipeline.stages.teacher.amp=false",
    "runtime.progress=false",
]


def _stage_dirs(store: Path, name: str):
    return [p for p in (store / "stages").glob(f"{name}-*") if p.is_dir()]


@pytest.mark.parametrize(
    "how",
    [
        "SIGTERM",  # what a process manager sends
        "SIGINT-group",  # Ctrl-C in a terminal: the whole foreground process group
        "SIGINT-process",  # kill -INT <pid>: the command alone
    ],
)
def test_interrupt_stops_the_stage_ends_runs_killed_and_caches_nothing(tmp_path, how):
    store = tmp_path / "mlruns"
    proc = start_cli(store, LONG, temporary_server=True)  # its server must go too
    sig = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    try:
        wait_inside_stage(proc, store, "teacher")
        t0 = time.monotonic()
        if how == "SIGINT-group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=60)
        assert time.monotonic() - t0 < 30, f"{how} must not wait for the stage to finish"
        out = proc.stdout.read()
        assert proc.returncode == 128 + sig, out[-3000:]
        assert f"interrupted by {sig.name}" in out and "Traceback" not in out, out[-3000:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the temporary Prefect server goes too
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{how}: processes of the command outlived it")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    runs = store_runs(store)
    statuses = {r.data.tags.get("bonsai.stage", "pipeline"): r.info.status for r in runs}
    assert statuses == {"pipeline": "KILLED", "teacher": "KILLED"}
    teacher = next(r for r in runs if r.data.tags.get("bonsai.stage") == "teacher")
    assert sig.name in teacher.data.tags["bonsai.error"]
    assert _stage_dirs(store, "teacher") == []  # only a .tmp- directory, which nothing trusts
    assert not list((store / "records").glob("teacher-*"))  # nothing cached


def test_sigkill_runs_are_reaped_and_the_rerun_recomputes(tmp_path, prefect_server):
    store = tmp_path / "mlruns"
    proc = start_cli(store, LONG)
    try:
        wait_inside_stage(proc, store, "teacher")
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of the command left
            os.killpg(proc.pid, signal.SIGKILL)
    assert {r.info.status for r in store_runs(store)} == {"RUNNING"}  # what SIGKILL leaves
    assert list((store / "stages").glob(".tmp-teacher-*"))
    assert _stage_dirs(store, "teacher") == []

    # The next start marks the dead process's runs KILLED and removes its temporary files.
    result = compress(
        compose_config(
            ["data=synthetic", "debug=fast", "teacher=cnn_large", f"tracking.store_dir={store}"]
        )
    )
    runs = store_runs(store)
    assert "RUNNING" not in {r.info.status for r in runs}
    dead = [r for r in runs if r.info.status == "KILLED"]
    assert len(dead) == 2 and all("died" in r.data.tags["bonsai.error"] for r in dead)
    assert not list((store / "stages").glob(".tmp-*"))
    fresh = MlflowClient(result["tracking_uri"]).get_run(result["stages"]["teacher"]["run_id"])
    assert fresh.info.status == "FINISHED"
