"""A killed run resumes where it stopped; a multirun sweep shares its cached upstream stages."""

import contextlib
import os
import signal
from collections import Counter

import pytest

from tests.helpers import run_cli, start_cli, store_runs, wait_inside_stage

pytestmark = pytest.mark.slow
STAGES = {"teacher", "student", "onnx", "int8"}
# Short teacher, long enough student to be killed in the middle of.
ARGS = [
    "data=synthetic",
    "data.num_train=2048",
    "teacher=cnn_large",
    "student=cnn_tiny",
    "pipeline.stages.teacher.epochs=2",
    "pipeline.stages.teacher.amp=false",
    "pipeline.stages.student.epochs=40",
    "runtime.progress=false",
    "eval.repeats=20",
    "eval.compare_rounds=2",
    "eval.footprint=false",  # fresh-process memory probes: covered by test_flow_smoke and test_edge
]


def test_killed_run_resumes_from_the_last_finished_stage(tmp_path):
    store = tmp_path / "mlruns"
    proc = start_cli(store, ARGS)
    try:
        wait_inside_stage(proc, store, "student", settle=0.5)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of the command left
            os.killpg(proc.pid, signal.SIGKILL)
    teacher_dirs = list((store / "stages").glob("teacher-*"))
    assert len(teacher_dirs) == 1  # the teacher had finished before the kill

    # The rerun may change what was killed (a shorter student here): the teacher's key does not
    # depend on the student's settings, so it is reused all the same.
    rerun = start_cli(store, [*ARGS, "pipeline.stages.student.epochs=2"])
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    runs = store_runs(store)
    assert "RUNNING" not in {r.info.status for r in runs}
    # Every stage was computed exactly once across both runs (the teacher in the first).
    computed = Counter(
        r.data.tags["bonsai.stage"]
        for r in runs
        if r.info.status == "FINISHED" and r.data.tags.get("bonsai.cached") == "false"
    )
    assert computed == Counter(STAGES)
    finished_parents = [
        r
        for r in runs
        if r.data.tags.get("bonsai.role") == "pipeline" and r.info.status == "FINISHED"
    ]
    assert len(finished_parents) == 1
    children = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == finished_parents[0].info.run_id
    ]
    assert sorted(r.data.tags["bonsai.stage"] for r in children) == sorted(STAGES)
    teacher = next(r for r in children if r.data.tags["bonsai.stage"] == "teacher")
    assert teacher.data.tags["bonsai.cached"] == "true"
    assert teacher_dirs == list((store / "stages").glob("teacher-*"))


def test_a_parallel_two_by_two_sweep_splits_the_cores_and_shares_the_cached_teacher(tmp_path):
    """joblib launcher: 4 jobs, 2 at once, each with half the cores; the teacher all four need is
    built once (the two jobs that start together wait on its lock) and the command returns.
    (The basic launcher's sweep: tests/flow/test_first_hour.py.)"""
    store = tmp_path / "mlruns"
    proc = run_cli(
        store,
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "data=synthetic",
            "debug=fast",
            "teacher=cnn_large",
            "pipeline.stages.student.temperature=2,8",
            "pipeline.stages.student.alpha=0.5,0.9",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = store_runs(store)
    assert {r.info.status for r in runs} == {"FINISHED"}
    parents = [r for r in runs if r.data.tags.get("bonsai.role") == "pipeline"]
    assert len(parents) == 4
    combos = set()
    for p in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        assert sorted(r.data.tags["bonsai.stage"] for r in children) == sorted(STAGES)
        student = next(r for r in children if r.data.tags["bonsai.stage"] == "student")
        combos.add((float(student.data.params["temperature"]), float(student.data.params["alpha"])))
    assert combos == {(t, a) for t in (2.0, 8.0) for a in (0.5, 0.9)}
    teachers = [r for r in runs if r.data.tags.get("bonsai.stage") == "teacher"]
    assert Counter(r.data.tags["bonsai.cached"] for r in teachers) == {"false": 1, "true": 3}
    cpus = len(os.sched_getaffinity(0))
    threads = {
        r.data.params["runtime.torch_threads"] for r in runs if "bonsai.stage" in r.data.tags
    }
    assert threads == {str(max(1, cpus // 2))}
