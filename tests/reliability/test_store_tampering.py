"""Files in the store edited by hand: a record is trusted only if it is the JSON Bonsai wrote for
its key, and the artifact it describes is the one at the path its key dictates. Everything else is
a cache miss (the stage is rebuilt), never foreign code run, never another stage's model served."""

import base64
import json
import os
import pickle
from pathlib import Path

import pytest

from bonsai.store import Store
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


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    path = tmp_path_factory.mktemp("tamper") / "mlruns"
    assert built(run(path)) == ["teacher", "student", "onnx", "int8"]
    return path


def keys(result) -> dict[str, str]:
    return {n: s["key"] for n, s in result["stages"].items()}


class Payload:
    """Unpickling this creates `marker`: the side effect that must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_planted_as_a_cache_record_never_runs(store, tmp_path):
    first = run(store)
    key = keys(first)["student"]
    marker = tmp_path / "payload-ran"
    blob = pickle.dumps(Payload(marker))
    # A Prefect-style record (what Prefect's result cache would read) in Bonsai's record file...
    prefect_style = {
        "metadata": {"serializer": {"type": "pickle"}, "storage_key": key, "expiration": None},
        "result": base64.b64encode(blob).decode(),
    }
    Store(store).record_path(key).write_text(json.dumps(prefect_style))
    # ...and in the folders Prefect's cache used: nothing may read them.
    for folder in ("prefect/cache-keys", "prefect/results", "prefect/storage"):
        (store / folder).mkdir(parents=True, exist_ok=True)
        (store / folder / key).write_text(json.dumps(prefect_style))
        (store / folder / f"{key}.pickle").write_bytes(blob)
    again = run(store)
    assert not marker.exists(), "a pickle from the store was deserialized"
    assert built(again) == ["student"]  # refused and rebuilt; its downstream verified unchanged
    assert json.loads(Store(store).record_path(key).read_text())["key"] == key


def test_a_record_pointing_at_another_stages_artifact_is_a_miss(store):
    first = run(store)
    k = keys(first)
    s = Store(store)
    int8 = json.loads(s.record_path(k["int8"]).read_text())
    onnx = json.loads(s.record_path(k["onnx"]).read_text())
    # Swap in the fp32 export's digest and metrics: the int8 stage would serve the fp32 model.
    int8["artifact_digest"] = onnx["artifact_digest"]
    int8["evaluation"] = onnx["evaluation"]
    s.record_path(k["int8"]).write_text(json.dumps(int8))
    again = run(store)
    assert built(again) == ["int8"]
    assert again["stages"]["int8"]["artifact"]["path"] == str(s.stage_dir(k["int8"]))
    assert (
        again["stages"]["int8"]["metrics"]["bytes"]
        < 0.5 * again["stages"]["onnx"]["metrics"]["bytes"]
    )


def test_a_record_naming_its_own_path_is_refused(store):
    first = run(store)
    k = keys(first)
    s = Store(store)
    rec = json.loads(s.record_path(k["int8"]).read_text())
    rec["path"] = str(s.stage_dir(k["onnx"]))  # not a field Bonsai writes: extra keys refused
    s.record_path(k["int8"]).write_text(json.dumps(rec))
    assert built(run(store)) == ["int8"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_record_is_rebuilt_not_an_error(store, damage):
    k = keys(run(store))["onnx"]
    path = Store(store).record_path(k)
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "empty": "", "garbage": "\x00{]"}[damage])
    assert built(run(store)) == ["onnx"]
    json.loads(path.read_text())  # written whole again


def test_a_truncated_timed_model_is_remeasured(store):
    result = run(store)
    teacher_key = keys(result)["teacher"]
    latency = Store(store).latency_model(teacher_key, "torch")
    latency.write_bytes(latency.read_bytes()[:1000])
    again = run(store)
    assert built(again) == []  # the artifact itself is intact: nothing is retrained
    assert again["stages"]["teacher"]["metrics"]["latency_p50_ms"] > 0
    assert latency.stat().st_size > 100_000  # exported again, whole
    assert len(again["rows"]) == 4  # the comparison timed every variant
