"""`bonsai.build.run_stage`: one stage through the store's cache and the one evaluator, with no
Prefect and no MLflow (what benches and notebooks call)."""

from __future__ import annotations

import json

import pytest

from bonsai.build import run_stage
from bonsai.data import load_data
from bonsai.store import Store, read_record

FAST_EVAL = {"warmup": 1, "repeats": 10, "footprint": False}
TRAIN = {"model": {"name": "cnn", "width": 8}, "epochs": 1}


@pytest.fixture(scope="module")
def data():
    return load_data({"name": "synthetic", "num_train": 128, "num_test": 64})


def test_a_stage_is_built_once_then_reused_and_its_record_holds_its_measurements(data, tmp_path):
    first = run_stage(tmp_path, "teacher", "train", TRAIN, data, eval_cfg=FAST_EVAL)
    assert first.built and first.key.startswith("teacher-")
    record, why = read_record(Store(tmp_path), first.key)
    assert record is not None, why
    assert record.artifact_digest == first.artifact.digest
    # The recorded accuracy is the built model's, recomputed here from the artifact.
    from bonsai.artifacts import load_torch
    from bonsai.training import predict_logits

    pred = predict_logits(load_torch(first.artifact), data.test_x).argmax(1)
    ours = 100.0 * float((pred == data.test_y).float().mean())
    assert first.metrics["accuracy"] == pytest.approx(ours, abs=1e-6)
    assert first.metrics["params"] == sum(
        p.numel() for p in load_torch(first.artifact).parameters()
    )
    assert first.metrics["latency_p50_ms"] > 0

    again = run_stage(tmp_path, "teacher", "train", TRAIN, data, eval_cfg=FAST_EVAL)
    assert not again.built
    assert again.record is not None and again.record.build_id == record.build_id
    assert again.metrics == first.metrics

    # A downstream stage keys on its input's digest; its export reuses the evaluator's export.
    onnx = run_stage(tmp_path, "onnx", "export.onnx", {}, data, input=first, eval_cfg=FAST_EVAL)
    assert onnx.built and onnx.artifact.kind == "onnx"
    assert onnx.metrics["accuracy"] == first.metrics["accuracy"]

    forced = run_stage(tmp_path, "teacher", "train", TRAIN, data, eval_cfg=FAST_EVAL, force=True)
    assert forced.built and forced.record is not None
    assert forced.record.build_id != record.build_id


def test_other_parameters_or_seed_are_another_key(data, tmp_path):
    a = run_stage(tmp_path, "t", "train", TRAIN, data, evaluate=False)
    b = run_stage(tmp_path, "t", "train", {**TRAIN, "lr": 0.01}, data, evaluate=False)
    c = run_stage(tmp_path, "t", "train", TRAIN, data, seed=1, evaluate=False)
    assert len({a.key, b.key, c.key}) == 3
    assert a.record is None
    with pytest.raises(ValueError, match="built without evaluation"):
        _ = a.metrics
    # Without a record nothing proves what a folder at the key holds: unevaluated runs rebuild.
    assert run_stage(tmp_path, "t", "train", TRAIN, data, evaluate=False).built


def test_an_edited_record_or_artifact_is_a_miss_and_the_stage_is_rebuilt(data, tmp_path):
    first = run_stage(tmp_path, "t", "train", TRAIN, data, eval_cfg=FAST_EVAL)
    manifest = first.artifact.path / "artifact.json"
    meta = json.loads(manifest.read_text())
    meta["meta"]["model"]["params"] += 1  # a hand edit: the manifest no longer has its digest
    manifest.write_text(json.dumps(meta))
    lines: list[str] = []
    again = run_stage(tmp_path, "t", "train", TRAIN, data, eval_cfg=FAST_EVAL, log=lines.append)
    assert again.built
    assert any("cached result not usable" in line for line in lines), lines
    assert again.artifact.meta["model"]["params"] == first.metrics["params"]
