"""A user's own ONNX model through the command line: `pipeline=from_onnx` imports it, quantizes
it three ways with their speed guards, and prints the table with the imported model as the
reference, at the accuracy the user's own script measured; no torch model is made."""

from __future__ import annotations

import json

from bonsai.data import load_data
from tests.helpers import run_cli
from tests.own_model import save_onnx, train_plain


def _row(table: str, stage: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {stage} "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_from_onnx_quantizes_the_users_model_against_itself(tmp_path):
    # The data debug=fast gives the run: digits, 256 training and 128 test images.
    data = load_data({"name": "digits", "max_train": 256, "max_test": 128})
    net, accuracy = train_plain(data)
    path = save_onnx(net, tmp_path / "mine.onnx")

    store = tmp_path / "store"
    proc = run_cli(
        store, ["pipeline=from_onnx", f"pipeline.stages.model.path={path}", "debug=fast"], 600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = _row(proc.stdout, "stage")
    model = dict(zip(header, _row(proc.stdout, "model"), strict=True))
    assert model["kind"] == "import" and model["Δacc pts"] == "+0.00"
    assert model["speedup"] == "1.00x" and model["agree %"] == "100.0"
    assert model["acc %"] == f"{accuracy:.2f}"
    int8 = dict(zip(header, _row(proc.stdout, "int8"), strict=True))
    assert int8["kind"] == "quantize.static" and int8["guard"] in ("ok", "FAIL")
    assert int8["vs parent"].endswith("x")
    for stage in ("fp16", "dynamic"):
        assert _row(proc.stdout, stage)
    kinds = {
        json.loads((d / "artifact.json").read_text())["kind"]
        for d in (store / "stages").iterdir()
        if (d / "artifact.json").is_file()
    }
    assert kinds == {"onnx"}, "no torch model is needed or made"
