"""Cached, resumable stages: finished work whose inputs did not change is never redone."""

import pytest
from mlflow.tracking import MlflowClient

from flows.compress import compose_config, compress

pytestmark = pytest.mark.slow
STAGES = ["teacher", "student", "onnx", "int8"]


def run(store, *overrides):
    raw = compose_config(
        [
            "data=synthetic",
            "debug=fast",
            "teacher=cnn_large",
            f"tracking.store_dir={store}",
            *overrides,
        ]
    )
    return compress(raw, list(overrides))


def built(result):
    """The stages this run computed (the others came from the cache)."""
    return [n for n, s in result["stages"].items() if not s["cached"]]


def artifact_dirs(store):
    return sorted(p.name for p in (store / "stages").iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    """A store holding one finished default run."""
    path = tmp_path_factory.mktemp("cache") / "mlruns"
    first = run(path)
    assert built(first) == STAGES
    return path


def test_identical_rerun_computes_nothing_and_still_logs_every_stage(store):
    before = {
        p: (store / "stages" / p / "artifact.json").stat().st_mtime_ns for p in artifact_dirs(store)
    }
    again = run(store)
    assert built(again) == []
    after = {
        p: (store / "stages" / p / "artifact.json").stat().st_mtime_ns for p in artifact_dirs(store)
    }
    assert after == before  # no artifact was rewritten

    client = MlflowClient(again["tracking_uri"])
    for name, stage in again["stages"].items():
        run_ = client.get_run(stage["run_id"])
        assert run_.info.status == "FINISHED"
        assert run_.data.tags["bonsai.cached"] == "true"
        origin = client.get_run(run_.data.tags["bonsai.cached_from_run_id"])
        assert origin.data.tags["bonsai.stage"] == name
        assert origin.data.tags["bonsai.cached"] == "false"
        for metric in ("accuracy", "bytes", "latency_p50_ms", "params"):
            assert run_.data.metrics[metric] == origin.data.metrics[metric]
        assert run_.data.tags["bonsai.model_uri"] == origin.data.tags["bonsai.model_uri"]


def test_downstream_change_runs_only_the_downstream_stage(store):
    n_before = len(artifact_dirs(store))
    result = run(store, "pipeline.stages.int8.calibration_samples=64")
    assert built(result) == ["int8"]
    assert len(artifact_dirs(store)) == n_before + 1


def test_upstream_change_recomputes_everything_after_it(store):
    result = run(store, "pipeline.stages.student.temperature=2")
    assert built(result) == ["student", "onnx", "int8"]


def test_data_change_recomputes_everything(store):
    result = run(store, "data.noise=0.35")
    assert built(result) == STAGES


def test_new_measurement_settings_remeasure_without_rebuilding(store):
    result = run(store, "eval.repeats=37")
    assert built(result) == []
    client = MlflowClient(result["tracking_uri"])
    remeasured = 0
    for stage in result["stages"].values():
        r = client.get_run(stage["run_id"])
        assert r.data.params["runtime.eval_repeats"] == "37"
        origin = client.get_run(r.data.tags["bonsai.cached_from_run_id"])
        assert r.data.metrics["accuracy"] == origin.data.metrics["accuracy"]
        remeasured += r.data.metrics["latency_p50_ms"] != origin.data.metrics["latency_p50_ms"]
    assert remeasured >= 1


def test_force_recomputes_a_stage_or_all(store):
    assert built(run(store, "runtime.force=[onnx]")) == ["onnx"]
    assert built(run(store, "runtime.force=all")) == STAGES


def test_corrupted_cached_artifact_is_rebuilt_not_trusted(store):
    teacher_dir = run(store)["stages"]["teacher"]["artifact"]["path"]
    weights = store / "stages" / teacher_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    result = run(store)
    assert "teacher" in built(result)
    from bonsai.artifacts import open_artifact

    open_artifact(store / "stages" / teacher_dir)  # verifies again


def test_independent_branches_run_concurrently_without_oversubscribing(tmp_path, prefect_server):
    store = tmp_path / "mlruns"
    result = run(store, "pipeline=two_students", "runtime.cpus=2", "runtime.max_workers=2")
    client = MlflowClient(result["tracking_uri"])
    runs = {n: client.get_run(s["run_id"]) for n, s in result["stages"].items()}
    for r in runs.values():
        assert r.data.params["runtime.torch_threads"] == "1"  # 2 workers x 1 thread <= 2 cpus
    # runtime.device as asked for, and where it resolved on this machine (cpu, cuda:0)
    from bonsai.devices import resolve_device

    here = str(resolve_device("auto"))
    parent = client.get_run(result["parent_run_id"]).data.params
    assert (parent["runtime.device"], parent["runtime.device_resolved"]) == ("auto", here)
    for r in runs.values():
        assert (r.data.params["runtime.device"], r.data.params["runtime.device_resolved"]) == (
            "auto",
            here,
        )
    a, b = runs["small"].info, runs["tiny"].info
    assert a.start_time < b.end_time and b.start_time < a.end_time, "branches did not overlap"
