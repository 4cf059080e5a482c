"""Files on disk are never trusted blindly: checksums, no pickle, no escaping external data."""

import os
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


# Loaders that run code from the file (unpickle, compile, exec) and the functions allowed to call
# them: each checks `trust` (an explicit `trust: true` of the import stage) or the bytes first.
UNSAFE_LOADERS = {"pickle.load", "pickle.loads", "torch.jit.load", "torch.export.load"}
AUDITED = {
    # torch.load(weights_only=False) / torch.jit.load / torch.export.load, each after `trust`
    ("bonsai/model_files.py", "_torch_load"),
    ("bonsai/model_files.py", "read_checkpoint"),
    # torch.export.load of bytes that passed the program check (bonsai/formats/program_format.py)
    ("bonsai/formats/program_format.py", "load_program"),
}


def unsafe_loads(tree) -> list[tuple[str, int, str]]:
    """(enclosing function, line, call) for every call that may run code from a file."""
    import ast

    found = []

    def name(node) -> str:
        return (
            f"{name(node.value)}.{node.attr}"
            if isinstance(node, ast.Attribute)
            else getattr(node, "id", "?")
        )

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                called = name(child.func)
                kw = {k.arg: k.value for k in child.keywords}

                def const(key, kw=kw):
                    v = kw.get(key)
                    return v.value if isinstance(v, ast.Constant) else None

                # allow_pickle=True, or a value decided at run time
                pickles = "allow_pickle" in kw and const("allow_pickle") is not False
                if called in UNSAFE_LOADERS:
                    found.append((f, child.lineno, called))
                elif called == "torch.load" and const("weights_only") is not True:
                    found.append((f, child.lineno, "torch.load without weights_only=True"))
                elif called in ("np.load", "numpy.load") and pickles:
                    found.append((f, child.lineno, "np.load(allow_pickle=...)"))
            visit(child, f)

    visit(tree, "<module>")
    return found


def test_no_code_path_unpickles_from_disk_except_the_audited_trusted_loads():
    import ast

    offenders, audited = [], set()
    for folder in ("bonsai", "tasks", "flows"):
        for p in (ROOT / folder).rglob("*.py"):
            rel = str(p.relative_to(ROOT))
            for func, line, call in unsafe_loads(ast.parse(p.read_text())):
                if (rel, func) in AUDITED:
                    audited.add((rel, func))
                else:
                    offenders.append(f"{rel}:{line} in {func}: {call}")
    assert offenders == []
    assert audited == AUDITED  # each audited place still exists (a stale entry would hide one)
    # The trusted ones check `trust` before loading.
    src = (ROOT / "bonsai/model_files.py").read_text()
    for func in ("_torch_load", "read_checkpoint"):
        body = src[src.index(f"def {func}(") :]
        body = body[: body.index("\ndef ", 1)]
        assert "if not trust" in body, func


def test_the_audit_finds_an_unsafe_load():
    import ast

    code = (
        "import torch, pickle, numpy as np\n"
        "def f(p):\n"
        "    torch.load(p)\n"
        "    torch.load(p, weights_only=False)\n"
        "    pickle.loads(p)\n"
        "    np.load(p, allow_pickle=True)\n"
        "    torch.load(p, weights_only=True)\n"
    )
    assert [(f, n) for f, n, _ in unsafe_loads(ast.parse(code))] == [
        ("f", 3), ("f", 4), ("f", 5), ("f", 6)
    ]  # fmt: skip


def test_mlflow_pickle_deserialization_is_disabled():
    import tasks.tracking  # noqa: F401

    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
