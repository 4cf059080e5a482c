"""Promotion through the MLflow Model Registry, on real pipeline runs: the daily loop of running
variants, comparing them, promoting the one that fits, loading it by name, replaying it."""

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from bonsai.data import load_data
from bonsai.errors import ConfigError
from flows.compress import compose_config, compress
from tests.helpers import run_module, start_module

pytestmark = pytest.mark.slow
# min_speedup=0: int8 always passes its speed guard, so which variant wins is decided by the
# policy alone (on a model this tiny int8 can measure slower than fp32; the guard's own verdict
# is tested in tests/unit/test_quantize.py and tests/unit/test_promotion_policy.py).
BASE = ["data=synthetic", "debug=fast", "teacher=cnn_large", "pipeline.stages.int8.min_speedup=0"]
NAME = "bonsai-synthetic-edge_small"
# edge_small, without the accuracy bound: 1-epoch students are far below their teacher.
LOOSE = ["promote=edge_small", "promote.constraints.max_accuracy_drop=null"]


def cfg(store, *overrides):
    return compose_config([*BASE, f"tracking.store_dir={store}", *overrides])


def promote(store, *overrides):
    from flows.promote import promote_runs

    return promote_runs(cfg(store, *overrides))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_server):
    """Three pipeline runs whose int8 variants differ in size: default, tiny, wide students."""
    store = tmp_path_factory.mktemp("promo") / "mlruns"
    out = {}
    for name, extra in (
        ("default", []),
        ("tiny", ["student=cnn_tiny"]),
        ("wide", ["student.width=64"]),
    ):
        out[name] = compress(cfg(store, *extra), [*BASE, *extra])["parent_run_id"]
    return store, out


def client(store):
    c = MlflowClient(f"sqlite:///{store}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    return c


def test_no_candidate_satisfies_the_policy_nothing_moves(runs):
    store, ids = runs
    result = promote(store, "promote=edge_small", f"promote.run_id={ids['default']}")
    assert result["decision"] == "none" and result["version"] is None
    report = result["report"]
    for stage in ("onnx", "int8"):  # the ONNX candidates, each with its failed constraint
        assert f"| {stage} (run " in report
    assert report.count("accuracy drop") >= 2 and "> max_accuracy_drop 1.00" in report
    assert "a torch model" in report  # teacher and student are not deployable
    assert not client(store).search_registered_models(f"name = '{NAME}'")


def test_better_moves_champion_worse_is_challenger_old_stays_reachable(runs):
    store, ids = runs
    c = client(store)
    first = promote(store, *LOOSE, f"promote.run_id={ids['default']}")
    assert (first["decision"], first["version"]) == ("champion", "1")
    better = promote(store, *LOOSE, f"promote.run_id={ids['tiny']}")  # a smaller int8
    assert (better["decision"], better["version"]) == ("champion", "2")
    worse = promote(store, *LOOSE, f"promote.run_id={ids['wide']}")  # a bigger one
    assert (worse["decision"], worse["version"]) == ("challenger", "3")
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert str(c.get_model_version_by_alias(NAME, "challenger").version) == "3"
    assert mlflow.pyfunc.load_model(f"models:/{NAME}/1") is not None  # the old champion
    again = promote(store, *LOOSE, f"promote.run_id={ids['tiny']}")
    assert again["decision"] == "unchanged"  # already the champion: no new version
    assert len(c.search_model_versions(f"name = '{NAME}'")) == 3

    v2 = c.get_model_version(NAME, "2")
    # The smallest deployable variant: the tiny student's int8.
    assert v2.tags["bonsai.stages"] == "teacher > student > onnx > int8"
    assert v2.tags["bonsai.pipeline_run_id"] == ids["tiny"]
    for tag in (
        "bonsai.config_hash",
        "bonsai.data_digest",
        "bonsai.git_commit",
        "bonsai.source_run_id",
    ):
        assert v2.tags[tag], tag
    promo_runs = c.search_runs(
        [c.get_experiment_by_name("bonsai").experiment_id], "tags.`bonsai.role` = 'promote'"
    )
    assert {r.data.tags["bonsai.decision"] for r in promo_runs} >= {"champion", "challenger"}


def test_the_champion_loads_by_alias_and_in_plain_onnxruntime_as_evaluated(runs):
    import onnxruntime as ort

    from bonsai.data import preprocess

    store, _ = runs
    c = client(store)
    data = load_data(cfg(store)["data"])
    champ = c.get_model_version_by_alias(NAME, "champion")
    evaluated = c.get_run(champ.tags["bonsai.source_run_id"]).data.metrics["accuracy"]
    out = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(data.raw_test)
    labels = data.test_y.numpy()
    assert 100 * float((out["class_index"].to_numpy() == labels).mean()) == evaluated

    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion")
    sess = ort.InferenceSession(f"{local}/artifacts/bonsai_artifact/model.onnx")
    x = preprocess(data.raw_test, data.raw_format, data.mean, data.std)
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert (logits.argmax(1) == out["class_index"].to_numpy()).all()


def test_a_gated_variant_is_never_a_candidate(runs, tmp_path):
    store, _ = runs
    from bonsai.errors import StageFailed

    with pytest.raises(StageFailed):  # the export parity gate fails: no ONNX variant at all
        compress(cfg(store, "pipeline.stages.onnx.parity_tol=1e-12"), [])
    result = promote(store, *LOOSE, "promote.scope=experiment", "promote.dry_run=true")
    failed_parent = client(store).search_runs(
        [client(store).get_experiment_by_name("bonsai").experiment_id],
        "tags.`bonsai.role` = 'pipeline' and attributes.status = 'FAILED'",
    )[0]
    assert failed_parent.info.run_id[:8] not in result["report"]
    assert "(dry run: nothing changed)" in result["report"]


def test_compare_puts_every_run_in_one_table_and_logs_it(runs):
    from flows.compare import compare

    store, ids = runs
    result = compare(cfg(store, "compare.pipeline=default"))
    assert set(ids.values()) <= set(result["runs"])
    assert {r["stage"] for r in result["rows"]} >= {"teacher", "student", "onnx", "int8"}
    files = {a.path for a in client(store).list_artifacts(result["run_id"])}
    assert {"comparison.csv", "comparison.md", "plots"} <= files


def test_two_promotions_racing_leave_exactly_one_champion(runs):
    store, ids = runs
    name = "race-model"
    args = [
        *BASE, *LOOSE, f"tracking.store_dir={store}",
        f"promote.run_id={ids['tiny']}", f"promote.model_name={name}",
    ]  # fmt: skip
    procs = [start_module("flows.promote", args) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    c = client(store)
    versions = c.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, [v.version for v in versions]
    assert c.get_model_version_by_alias(name, "champion").version == versions[0].version
    assert sum("Decision: unchanged" in o for o in outs) == 1


def test_replay_rebuilds_the_champion_and_reproduces_it(runs):
    store, _ = runs
    # Accuracy, params, MACs and bytes must match exactly; the speedup over the reference stage
    # (timed side by side in each run) within a tolerance. debug=fast times each variant 20
    # times; on a loaded 2-core CI machine this int8's speedup over its 0.5 ms teacher read
    # 10.4x at build and 17.1x at replay (+64%), and its absolute p50 (shown, not judged) moved
    # 2.8x in another run: the test allows +-300% (the command's default is +-50%), and the
    # strict replay below checks that the speedup is what decides.
    proc = run_module(
        "flows.replay",
        [f"models:/{NAME}@champion", f"tracking.store_dir={store}", "replay.latency_tolerance=3"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Reproduced: every metric matches." in proc.stdout
    rows = {ln.split("|")[1].strip(): ln.split("|")[4].strip()
            for ln in proc.stdout.splitlines() if ln.startswith("| ") and "---" not in ln}  # fmt: skip
    assert rows == {"metric": "match", "accuracy": "yes", "params": "yes", "macs": "yes",
                    "bytes": "yes", "speedup": "yes",
                    "latency_p50_ms": "(not judged: machine load)"}, proc.stdout  # fmt: skip
    # It trained on the device the original trained on (recorded), not on whatever `auto` finds.
    [replay] = client(store).search_runs(
        [client(store).get_experiment_by_name("bonsai").experiment_id],
        "tags.`bonsai.replay_of` LIKE '%'",
    )
    assert replay.data.params["runtime.device"] == "cpu"
    assert replay.data.params["runtime.device_resolved"] == "cpu"
    # A speedup off by more than the tolerance (here: any difference) is a failed replay.
    strict = run_module(
        "flows.replay",
        [
            f"models:/{NAME}@champion",
            f"tracking.store_dir={store}",
            "replay.latency_tolerance=1e-9",
        ],
    )
    assert strict.returncode == 1, strict.stdout[-3000:] + strict.stderr[-3000:]
    assert "| speedup |" in strict.stdout and "| NO |" in strict.stdout


def test_promote_and_replay_refuse_what_they_cannot_use(runs, tmp_path):
    with pytest.raises(ConfigError, match="no finished pipeline run"):
        promote(tmp_path / "empty", *LOOSE)
    store, _ = runs
    # A version registered by hand, without Bonsai's lineage: nothing to replay.
    c = client(store)
    champ = c.get_model_version_by_alias(NAME, "champion")
    bare = mlflow.register_model(champ.source, "hand-made")
    proc = run_module(
        "flows.replay",
        [f"models:/hand-made/{bare.version}", f"tracking.store_dir={store}"],
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has no Bonsai lineage" in proc.stderr
    assert len(c.search_model_versions("name = 'hand-made'")) == 1  # nothing registered
    np.testing.assert_equal(c.get_model_version_by_alias(NAME, "champion").version, champ.version)
