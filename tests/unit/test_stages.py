"""Each stage on tiny data, each test proving the stage's effect."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from bonsai.artifacts import load_torch
from bonsai.errors import GateError
from bonsai.onnx_utils import run_logits, session
from bonsai.stages import REGISTRY
from bonsai.training import predict_logits
from tests.helpers import run_stage

CNN = {"name": "cnn", "width": 8, "depth": 2}


def accuracy(model, data):
    return float((predict_logits(model, data.test_x).argmax(1) == data.test_y).float().mean())


def test_registry_holds_every_stage_module():
    assert {"train", "distill", "export.onnx", "quantize.static", "export.coreml",
            "export.litert"} <= set(REGISTRY)  # fmt: skip
    for cls in REGISTRY.values():
        assert cls.produces in ("torch", "onnx", "coreml", "litert")
        # Mobile files end a chain (an imported torch.export program feeds export.onnx).
        assert all(k in (None, "torch", "torch_program", "onnx") for k in cls.consumes)
        assert cls.Config.model_config["extra"] == "forbid"
        assert cls.Config.model_config["frozen"] is True


@pytest.fixture(scope="module")
def teacher(synthetic, tmp_path_factory):
    return run_stage(
        "train",
        {"model": CNN, "epochs": 6, "lr": 0.01},
        synthetic,
        tmp_path_factory.mktemp("t") / "a",
    )


def test_train_learns_far_above_chance(synthetic, teacher):
    torch.manual_seed(0)
    from bonsai.models import build_model

    untrained = build_model(CNN, 1, 4)
    assert accuracy(untrained, synthetic) < 0.5
    assert accuracy(load_torch(teacher), synthetic) > 0.9
    meta = teacher.meta
    assert meta["model"]["params"] > 0 and meta["model"]["macs"] > 0
    assert len(meta["history"]) == 6
    assert meta["history"][-1]["loss"] < meta["history"][0]["loss"]
    assert meta["data"]["data_digest"] == synthetic.digest


def test_train_is_reproducible_with_a_seed(synthetic, tmp_path):
    a = run_stage("train", {"model": CNN, "epochs": 1}, synthetic, tmp_path / "a", seed=3)
    b = run_stage("train", {"model": CNN, "epochs": 1}, synthetic, tmp_path / "b", seed=3)
    assert a.file.read_bytes() == b.file.read_bytes()


def test_distill_moves_the_student_toward_the_teacher(synthetic, tmp_path):
    # A teacher that is confidently *wrong* in a known way: trained on labels shifted by one.
    shifted = dataclasses.replace(
        synthetic,
        train_y=(synthetic.train_y + 1) % 4,
        test_y=(synthetic.test_y + 1) % 4,
    )
    liar = run_stage("train", {"model": CNN, "epochs": 6, "lr": 0.01}, shifted, tmp_path / "liar")
    liar_preds = predict_logits(load_torch(liar), synthetic.test_x).argmax(1)

    def student(alpha, out):
        params = {"model": CNN, "epochs": 6, "lr": 0.01, "alpha": alpha, "temperature": 2.0}
        art = run_stage("distill", params, synthetic, tmp_path / out, teacher=liar)
        return predict_logits(load_torch(art), synthetic.test_x).argmax(1)

    kd = student(1.0, "kd")  # learns from the teacher only
    labels = student(0.0, "labels")  # learns from the true labels only
    agree_kd = float((kd == liar_preds).float().mean())
    agree_labels = float((labels == liar_preds).float().mean())
    assert agree_kd > 0.8, agree_kd
    assert agree_labels < 0.2, agree_labels


def test_distill_can_fine_tune_an_input_model(synthetic, teacher, tmp_path):
    art = run_stage(
        "distill",
        {"epochs": 1, "lr": 1e-4},
        synthetic,
        tmp_path / "ft",
        input=teacher,
        teacher=teacher,
    )
    assert art.meta["model"]["spec"] == CNN
    assert accuracy(load_torch(art), synthetic) > 0.9  # started from the trained weights


def test_export_onnx_matches_torch_with_dynamic_batch(synthetic, teacher, tmp_path):
    art = run_stage("export.onnx", {}, synthetic, tmp_path / "onnx", input=teacher)
    assert art.kind == "onnx" and art.file.name == "model.onnx"
    assert [p.name for p in art.path.iterdir() if p.suffix == ".data"] == []  # one file
    assert art.meta["parity_max_abs_diff"] < 1e-4
    sess = session(art.file)
    ref = predict_logits(load_torch(teacher), synthetic.test_x[:7]).numpy()
    for n in (1, 7):
        np.testing.assert_allclose(run_logits(sess, synthetic.test_x[:n]), ref[:n], atol=1e-4)


def test_exports_build_torchs_onnx_function_table_once_per_opset_with_the_same_bytes(
    tmp_path, monkeypatch
):
    import contextlib

    from torch.onnx._internal.exporter import _registration

    import bonsai.onnx_utils as ou
    from bonsai.models import build_model

    monkeypatch.setenv("BONSAI_TEST_EXPORT_CACHE", "0")  # every export here really runs
    builds = []
    torchs = _registration.ONNXRegistry.__dict__["from_torchlib"]

    def counting(cls, opset_version=18):
        builds.append(opset_version)
        return torchs.__func__(cls, opset_version=opset_version)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(ou, "_TORCHLIB_REGISTRIES", {})
    a = build_model(CNN, 1, 10).eval()
    b = build_model({"name": "cnn", "width": 4, "depth": 1}, 1, 10).eval()
    paths = [ou.export_onnx(m, (1, 8, 8), tmp_path / f"{i}.onnx") for i, m in enumerate([a, b, a])]
    assert builds == [18]  # three exports, one table
    ou.export_onnx(a, (1, 8, 8), tmp_path / "opset20.onnx", opset=20)
    assert builds == [18, 20]
    # torch's own path (a fresh table each export) writes the same bytes.
    monkeypatch.setattr(ou, "_torchlib_registry_reused", contextlib.nullcontext)
    for i, m in enumerate([a, b]):
        own = ou.export_onnx(m, (1, 8, 8), tmp_path / f"own{i}.onnx")
        assert own.read_bytes() == paths[i].read_bytes()
    assert builds == [18, 20, 18, 18]
    # Outside export_onnx, torch.onnx.export's table is torch's again.
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__ is counting


def test_export_parity_gate_fails_the_stage(synthetic, teacher, tmp_path, monkeypatch):
    import bonsai.stages.export_onnx as mod

    real = mod.parity_max_abs_diff  # as if onnxruntime's logits were 0.5 off torch's
    monkeypatch.setattr(mod, "parity_max_abs_diff", lambda m, p, x: real(m, p, x) + 0.5)
    with pytest.raises(GateError, match=r"max \|onnxruntime - torch\| = 0.5"):
        run_stage("export.onnx", {"parity_tol": 1e-3}, synthetic, tmp_path / "onnx", input=teacher)


def test_static_int8_is_small_and_keeps_accuracy(synthetic, tmp_path):
    wide = {"name": "cnn", "width": 48, "depth": 2, "convs_per_stage": 2}
    fp = run_stage("train", {"model": wide, "epochs": 4, "lr": 0.01}, synthetic, tmp_path / "fp")
    fp_onnx = run_stage("export.onnx", {}, synthetic, tmp_path / "fp_onnx", input=fp)
    q = run_stage(
        "quantize.static", {"calibration_samples": 128}, synthetic, tmp_path / "q", input=fp_onnx
    )
    ratio = q.file.stat().st_size / fp_onnx.file.stat().st_size
    assert ratio <= 0.3, ratio
    ops = {n.op_type for n in onnx.load(str(q.file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    labels = synthetic.test_y.numpy()
    acc_fp = (run_logits(session(fp_onnx.file), synthetic.test_x).argmax(1) == labels).mean()
    acc_q = (run_logits(session(q.file), synthetic.test_x).argmax(1) == labels).mean()
    assert acc_q >= acc_fp - 0.02, (acc_fp, acc_q)
    assert q.meta["calibration_samples"] == 128


def test_int8_accuracy_gate_fails_the_stage_with_the_numbers(
    synthetic, teacher, tmp_path, monkeypatch
):
    import bonsai.stages.quantize_static as mod

    fp_onnx = run_stage("export.onnx", {}, synthetic, tmp_path / "fp_onnx", input=teacher)
    measure = mod.logits_on

    def degraded(path, ctx, split="val"):
        # The int8 model's logits rolled by one class: most of its predictions become wrong.
        out = measure(path, ctx, split)
        return out if path == fp_onnx.file else np.roll(out, 1, axis=1)

    monkeypatch.setattr(mod, "logits_on", degraded)
    with pytest.raises(
        GateError,
        match=r"on the 26 validation images: a drop of [1-9]\d+\.\d\d points, above "
        r"tolerance=2 points \(the test split, which only reports: ",
    ):
        run_stage(
            "quantize.static", {"max_float_layers": 0}, synthetic, tmp_path / "q", input=fp_onnx
        )
    assert not list((tmp_path / "q").rglob("artifact.json"))  # no artifact, not even half
