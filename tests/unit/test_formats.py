"""Artifact formats are modules behind one table: a format declared here, in the test, is stored,
verified, evaluated by the one evaluator, served by the predictor and reloaded, with nothing else
in Bonsai told about it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bonsai.artifacts import atomic_dir, open_artifact, sha256_file, write_manifest
from bonsai.errors import ArtifactError
from bonsai.formats import FORMATS, Format, format_of_file, get_format
from bonsai.measure.evaluate import evaluate, top1
from bonsai.measure.footprint import installed_bytes, python_rss_bytes
from bonsai.predictor import Predictor
from bonsai.store import (
    EvaluationRecord,
    StageRecord,
    Store,
    evaluation_usable,
    read_record,
    verify_build,
    write_record,
)

KEY = "linear-0123456789abcdef"


class LinearSession:
    """A linear classifier in numpy behind onnxruntime's `run`/`get_inputs`: weights [D + 1, K],
    the last row the bias."""

    def __init__(self, weights: np.ndarray):
        self.weights = weights

    def get_inputs(self):
        return [SimpleNamespace(name="input", shape=["batch"])]

    def run(self, _names, feed):
        x = next(iter(feed.values()))
        return [(x.reshape(len(x), -1) @ self.weights[:-1] + self.weights[-1]).astype(np.float32)]


@pytest.fixture
def numpy_format():
    """A format that exists only while a test runs: `.npy` weights of a linear classifier."""

    class NumpyFormat(Format):
        kind = "numpy"
        model_file = "model.npy"
        runtime = "numpy"
        probe = """
import numpy as np
w = np.load(path)
np.zeros(shape, dtype=np.float32).reshape(1, -1) @ w[:-1] + w[-1]
"""

        def open_session(self, file: Path, threads: int = 1) -> LinearSession:
            return LinearSession(np.load(file, allow_pickle=False))

    yield FORMATS["numpy"]
    del FORMATS["numpy"]


def _fit(data) -> np.ndarray:
    """Least squares onto one-hot labels: a real, if plain, classifier."""
    x = data.train_x.numpy().reshape(len(data.train_x), -1)
    x = np.hstack([x, np.ones((len(x), 1), np.float32)])
    onehot = np.eye(data.num_classes, dtype=np.float32)[data.train_y.numpy()]
    return np.linalg.lstsq(x, onehot, rcond=None)[0].astype(np.float32)


def _meta(data, w: np.ndarray) -> dict:
    d, k = w.shape[0] - 1, w.shape[1]
    return {
        "model": {
            "params": int(w.size),
            "macs": d * k,
            "input_shape": list(data.input_shape),
            "num_classes": k,
        },
        "data": {
            "classes": list(data.classes),
            "normalize": {"mean": list(data.mean), "std": list(data.std)},
            "raw_format": dict(data.raw_format),
        },
    }


def test_a_format_declared_in_one_place_is_stored_evaluated_and_reloaded(
    numpy_format, digits, tmp_path
):
    w = _fit(digits)
    store = Store(tmp_path / "store")
    with atomic_dir(store.stage_dir(KEY)) as tmp:
        np.save(tmp / numpy_format.model_file, w)
        write_manifest(tmp, "numpy", _meta(digits, w))
    art = open_artifact(store.stage_dir(KEY))  # every checksum verified
    assert art.kind == "numpy" and art.file == store.stage_dir(KEY) / "model.npy"

    ev = evaluate(art, digits, store.eval_dir(KEY), warmup=2, repeats=10)
    # The evaluator's numbers are the classifier's own, computed here without Bonsai.
    x = digits.test_x.numpy().reshape(len(digits.test_x), -1)
    expected = (x @ w[:-1] + w[-1]).argmax(axis=1)
    y = digits.test_y.numpy()
    assert ev.metrics["accuracy"] == top1(expected, y) > 85  # 10 classes: chance is 10
    np.testing.assert_array_equal(ev.predictions, expected)
    assert ev.metrics["bytes"] == art.file.stat().st_size
    assert ev.metrics["params"] == w.size and ev.metrics["latency_p50_ms"] > 0
    assert "sparsity" not in ev.metrics  # not an ONNX graph, not a torch module
    assert ev.metrics["runtime_bytes"] == installed_bytes("numpy") > 1e6
    assert ev.metrics["peak_rss_bytes"] > python_rss_bytes()  # its probe ran in a fresh process
    assert ev.latency_model == art.file == store.latency_model(KEY, "numpy")

    # The store's record of the build stands, and a later run would reuse it.
    settings = {"threads": 1, "repeats": 10}
    write_record(
        store,
        StageRecord(
            key=KEY,
            name="linear",
            kind="numpy",
            build_id="0" * 32,
            artifact_digest=art.digest,
            stage_seconds=0.0,
            evaluation=EvaluationRecord(
                settings=settings,
                metrics=ev.metrics,
                predictions=ev.predictions.tolist(),
                latency_sha256=sha256_file(ev.latency_model),
            ),
        ),
    )
    record, why = read_record(store, KEY)
    assert record is not None, why
    again, why = verify_build(store, record)
    assert again is not None and again.digest == art.digest, why
    assert evaluation_usable(store, record, "numpy", settings)

    # Reloaded and served: raw test images in, the evaluated predictions out.
    served = Predictor(store.stage_dir(KEY)).predict(digits.raw_test)
    np.testing.assert_array_equal(served["class_index"], expected)

    # The checksums cover the new kind's file like any other.
    data = bytearray(art.file.read_bytes())
    data[-1] ^= 0xFF
    art.file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for .*model\.npy"):
        open_artifact(store.stage_dir(KEY))
    assert verify_build(store, record)[0] is None


def test_an_unregistered_kind_is_refused_naming_the_kinds_this_bonsai_reads(tmp_path):
    (tmp_path / "model.npy").write_bytes(b"\x93NUMPY")
    write_manifest(tmp_path, "numpy", {})
    with pytest.raises(ArtifactError, match="kinds coreml, litert, onnx, torch, torch_program$"):
        open_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="unknown artifact kind 'numpy'"):
        get_format("numpy")


def test_the_built_in_formats_keep_their_files_and_runtimes():
    # What stores on disk hold: changing any of these orphans every artifact already built.
    assert {k: f.model_file for k, f in FORMATS.items()} == {
        "torch": "model.safetensors",
        "onnx": "model.onnx",
        "litert": "model.tflite",
        "coreml": "model.mlpackage.zip",
        "torch_program": "model.pt2",
    }
    assert {k: f.runtime for k, f in FORMATS.items()} == {
        "torch": "torch",
        "onnx": "onnxruntime",
        "litert": "ai-edge-litert",
        "coreml": None,
        "torch_program": "torch",
    }
    assert [k for k, f in FORMATS.items() if not f.runs_here] == ["coreml"]
    # A torch model is timed through its ONNX export, which the ONNX format runs.
    assert get_format("torch").latency_file == "latency.onnx"
    assert get_format("torch_program").latency_file == "latency.onnx"
    assert [k for k, f in FORMATS.items() if f.holds_module] == ["torch", "torch_program"]
    assert format_of_file(Path("eval/latency.onnx")) is get_format("onnx")
    assert format_of_file(Path("model.mlpackage.zip")) is get_format("coreml")
    with pytest.raises(ArtifactError, match="no artifact format reads 'model.pt'"):
        format_of_file(Path("model.pt"))


def test_a_kind_registered_twice_is_refused(numpy_format):
    with pytest.raises(TypeError, match="registered twice"):

        class Again(Format):
            kind = "numpy"
            model_file = "model.npz"
            runtime = "numpy"

    assert FORMATS["numpy"] is numpy_format
