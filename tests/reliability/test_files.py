"""Files on disk are never trusted blindly: checksums, no pickle, no escaping external data."""

import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bonsai.artifacts import open_artifact, write_manifest
from bonsai.errors import ArtifactError
from bonsai.onnx_utils import session

ROOT = Path(__file__).resolve().parents[2]


def _onnx_with_external(folder: Path, location: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_onnx_external_data_outside_its_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(4, dtype=np.float32).tobytes())
    path = _onnx_with_external(tmp_path / "art", "../secret.bin")
    with pytest.raises(ArtifactError, match="outside its folder"):
        session(path)


def test_onnx_external_data_inside_its_folder_loads(tmp_path):
    path = _onnx_with_external(tmp_path / "art", "w.bin")
    (tmp_path / "art" / "w.bin").write_bytes(np.ones(4, dtype=np.float32).tobytes())
    out = session(path).run(None, {"x": np.ones((1, 2), dtype=np.float32)})[0]
    np.testing.assert_allclose(out, [[2.0, 2.0]])


def test_bit_flipped_onnx_artifact_is_refused(tmp_path):
    path = _onnx_with_external(tmp_path / "art", "w.bin")
    (tmp_path / "art" / "w.bin").write_bytes(np.ones(4, dtype=np.float32).tobytes())
    write_manifest(tmp_path / "art", "onnx", {})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for .*model.onnx"):
        open_artifact(tmp_path / "art")


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x00\x01 not protobuf")
    with pytest.raises(ArtifactError, match="cannot parse ONNX model"):
        session(tmp_path / "model.onnx")


def test_no_code_path_unpickles_from_disk():
    pattern = re.compile(
        r"pickle\.loads?\(|torch\.load\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
    )
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for folder in ("bonsai", "tasks", "flows")
        for p in (ROOT / folder).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_mlflow_pickle_deserialization_is_disabled():
    import tasks.tracking  # noqa: F401

    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
