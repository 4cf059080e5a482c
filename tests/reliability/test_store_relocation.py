"""A store is data a user owns and moves: copied (`cp -a`) or moved (`mv`) elsewhere, every
cached stage is still reused, and new runs write their artifacts into the store they run in,
never into the old folder (the README's Docker recipe makes a store at /app/mlruns and uses it
at $PWD/mlruns: the same move)."""

import shutil
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from flows.compress import compose_config, compress

pytestmark = pytest.mark.slow


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
    return [n for n, s in result["stages"].items() if not s["cached"]]


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_copied_then_moved_store_reuses_every_stage_and_writes_only_into_itself(
    tmp_path, prefect_server
):
    original = tmp_path / "a" / "mlruns"
    first = run(original)
    assert len(built(first)) == 4
    before = files(original)

    copy = tmp_path / "b" / "mlruns"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
    again = run(copy)
    assert built(again) == []
    assert files(original) == before, "the copy wrote into the original store"

    client = MlflowClient(again["tracking_uri"])
    for rid in [again["parent_run_id"], *(s["run_id"] for s in again["stages"].values())]:
        assert client.get_run(rid).info.artifact_uri.startswith(copy.resolve().as_uri() + "/")
    # Runs made before the copy read their artifacts from the copy too.
    old_parent = client.get_run(first["parent_run_id"])
    assert old_parent.info.artifact_uri.startswith(copy.resolve().as_uri() + "/")
    assert "comparison.md" in {a.path for a in client.list_artifacts(first["parent_run_id"])}

    moved = tmp_path / "c" / "mlruns"
    moved.parent.mkdir()
    shutil.move(str(copy), str(moved))
    third = run(moved)
    assert built(third) == []
    exp = MlflowClient(third["tracking_uri"]).get_experiment_by_name("bonsai")
    assert exp.artifact_location == (moved.resolve() / "artifacts" / "bonsai").as_uri()
