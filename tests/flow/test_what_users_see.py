"""What a user reads in MLflow and Prefect, and the models a user loads, after real runs."""

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from bonsai.data import load_data
from flows.compress import compose_config, compress

pytestmark = pytest.mark.slow
BASE = ["data=synthetic", "debug=fast", "teacher=cnn_large"]


def run(store, *overrides):
    raw = compose_config([*BASE, f"tracking.store_dir={store}", *overrides])
    return compress(raw, [*BASE, *overrides])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, prefect_server):
    store = tmp_path_factory.mktemp("ux") / "mlruns"
    first = run(store)
    second = run(store, "pipeline.stages.student.temperature=2")
    return store, first, second


def children(client, result):
    runs = client.search_runs(
        [client.get_run(result["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'",
    )
    return {r.data.tags["bonsai.stage"]: r for r in runs}


def test_the_experiment_opens_on_its_runs_not_the_genai_overview(two_runs):
    _, first, _ = two_runs
    client = MlflowClient(first["tracking_uri"])
    exp = client.get_experiment(first["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_runs_are_named_apart_and_a_sweep_variable_is_a_column(two_runs):
    _, first, second = two_runs
    client = MlflowClient(first["tracking_uri"])
    p1, p2 = (client.get_run(r["parent_run_id"]) for r in (first, second))
    assert p1.info.run_name == "default #1 · data=synthetic debug=fast teacher=cnn_large"
    assert p2.info.run_name.startswith("default #2 · ") and "temperature=2" in p2.info.run_name
    assert float(p2.data.params["pipeline.stages.student.temperature"]) == 2.0
    assert float(p1.data.params["pipeline.stages.student.temperature"]) == 4.0
    kids = children(client, second)
    assert kids["teacher"].info.run_name == f"teacher · {p2.info.run_name}"
    assert len({r.info.run_name for r in [*children(client, first).values(), *kids.values()]}) == 8


def test_stage_runs_log_every_knob_they_ran_with_and_their_dataset(two_runs):
    _, first, _ = two_runs
    client = MlflowClient(first["tracking_uri"])
    kids = children(client, first)
    int8 = kids["int8"].data.params
    assert int8["calibrate_method"] == "minmax" and int8["tolerance"] == "2.0"
    assert int8["kind"] == "quantize.static" and int8["stage"] == "int8"
    assert int8["pipeline"] == "default" and int8["input"] == "onnx"
    assert kids["teacher"].data.params["weight_decay"] == "0.0"
    digest = load_data(compose_config(BASE)["data"]).digest
    for r in [client.get_run(first["parent_run_id"]), *kids.values()]:
        [ds] = r.inputs.dataset_inputs
        assert ds.dataset.digest == digest and ds.dataset.name == "synthetic-test"


def test_every_accuracy_is_in_percent(two_runs):
    _, first, _ = two_runs
    client = MlflowClient(first["tracking_uri"])
    parent = client.get_run(first["parent_run_id"]).data.metrics
    for name, r in children(client, first).items():
        m = r.data.metrics
        assert 1 < m["accuracy"] <= 100, (name, m["accuracy"])  # 4 classes: chance is 25 %
        assert parent[f"{name}.accuracy"] == pytest.approx(m["accuracy"])
        assert 0 <= m["agreement"] <= 100
        assert m["accuracy_delta"] == pytest.approx(m["accuracy"] - parent["teacher.accuracy"])
    # int8's drop against its fp32 parent, in points (negative when int8 happens to score higher)
    drop = children(client, first)["int8"].data.metrics["accuracy_drop"]
    assert drop == pytest.approx(parent["onnx.accuracy"] - parent["int8.accuracy"])


def test_a_logged_model_takes_raw_images_and_answers_alike_for_torch_and_onnx(two_runs):
    _, first, _ = two_runs
    client = MlflowClient(first["tracking_uri"])
    mlflow.set_tracking_uri(first["tracking_uri"])
    data = load_data(compose_config(BASE)["data"])
    raw = data.raw_test  # as the data set stores it: float32 [N, C, H, W] in [0, 1] here
    outputs = {}
    for name, r in children(client, first).items():
        info = mlflow.models.get_model_info(r.data.tags["bonsai.model_uri"])
        model = mlflow.pyfunc.load_model(r.data.tags["bonsai.model_uri"])
        assert info.name == name  # named after the stage, not "model"
        out = model.predict(raw)
        assert list(out.columns) == ["class_index", "class_name", "probabilities"]
        assert set(out["class_name"]) <= set(data.classes)
        probs = np.stack(out["probabilities"].to_numpy())
        assert probs.shape == (len(raw), 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
        accuracy = 100 * float((out["class_index"].to_numpy() == data.test_y.numpy()).mean())
        assert accuracy == r.data.metrics["accuracy"], name  # exactly what was evaluated
        outputs[name] = out
    assert outputs["student"]["class_index"].tolist() == outputs["onnx"]["class_index"].tolist()


def test_the_flow_run_is_flat_in_prefect_and_carries_the_comparison(two_runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    _, first, _ = two_runs
    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[first["flow_run_id"]]))
        tasks = {t.name: t for t in client.read_task_runs(flow_run_filter=flow_run)}
        assert {"teacher", "student", "onnx", "int8"} <= set(tasks)
        for name in ("teacher", "student", "onnx", "int8"):
            assert not tasks[name].task_inputs.get("__parents__"), f"{name} drawn nested"
        student_inputs = {i.id for v in tasks["student"].task_inputs.values() for i in v}
        assert tasks["teacher"].id in student_inputs  # an edge, not nesting
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[first["flow_run_id"]])
            )
        )
    [table] = [a for a in arts if a.key == "comparison"]
    assert "| int8" in table.data and first["parent_run_id"] in table.data
