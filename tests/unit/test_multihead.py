"""Multi-task models (one backbone, a head per task) through every stage, and the mobile exports.

The two-head model is the digits with `heads=digit_parity`: the digit (10 classes) and whether it
is even, with derived labels.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import onnx
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from bonsai.artifacts import load_torch, open_artifact
from bonsai.data import DataConfig, expected_input, load_data
from bonsai.errors import ConfigError, StageFailed
from bonsai.heads import heads_from_meta, resolve_heads
from bonsai.measure.evaluate import evaluate
from bonsai.measure.single_task import single_task_torch
from bonsai.metrics import accuracy, head_accuracies
from bonsai.onnx_utils import run_logits, session
from bonsai.training import predict_logits
from tests.helpers import run_stage

HEADS = [
    {"name": "digit", "labels": "classes"},
    {"name": "parity", "labels": "even_odd", "weight": 0.5},
]
TEACHER = {"name": "cnn", "width": 32, "depth": 2}
STUDENT = {"name": "cnn", "width": 16, "depth": 2, "convs_per_stage": 2}
FAST = {"lr": 0.003, "batch_size": 64, "augment": "none"}


def cfg(**kw):
    return TypeAdapter(DataConfig).validate_python({"name": "digits", **kw})


@pytest.fixture(scope="module")
def two_heads():
    return load_data(cfg(heads=HEADS))


@pytest.fixture(scope="module")
def chain(two_heads, tmp_path_factory):
    """teacher -> KD student -> structured prune (KD fine-tuning) -> ONNX -> static int8."""
    root = tmp_path_factory.mktemp("chain")
    d = two_heads
    teacher = run_stage("train", {"model": TEACHER, "epochs": 8, **FAST}, d, root / "t")
    student = run_stage(
        "distill", {"model": STUDENT, "epochs": 10, **FAST}, d, root / "s", teacher=teacher
    )
    pruned = run_stage(
        "prune.structured",
        {"ratio": 0.3, "epochs": 4, **FAST},
        d,
        root / "p",
        input=student,
        teacher=teacher,
    )
    onnx_art = run_stage("export.onnx", {}, d, root / "o", input=pruned)
    int8 = run_stage("quantize.static", {"tolerance": 2.0}, d, root / "q", input=onnx_art)
    return {"teacher": teacher, "student": student, "pruned": pruned, "onnx": onnx_art,
            "int8": int8}  # fmt: skip


def per_head(art, data) -> dict[str, float]:
    if art.kind == "torch":
        logits = predict_logits(load_torch(art), data.test_x).numpy()
    else:
        logits = run_logits(session(art.file), data.test_x)
    return head_accuracies(logits, data.test_y.numpy(), data.heads)


# ---------------------------------------------------------------------------------------------
# Labels and losses


def test_heads_derive_their_labels_from_the_classes(two_heads):
    d = two_heads
    assert d.num_classes == 10 and d.num_outputs == 12
    t = d.heads.targets(d.test_y.numpy())
    assert t.shape == (len(d.test_y), 2)
    np.testing.assert_array_equal(t[:, 0], d.test_y.numpy())
    np.testing.assert_array_equal(t[:, 1], d.test_y.numpy() % 2)  # even -> 0, odd -> 1
    assert d.heads.heads[1].classes == ("even", "odd")
    assert expected_input(cfg(heads=HEADS)) == ((1, 8, 8), 12)
    # The same images with other labels are other data: its digest differs.
    assert d.digest != load_data(cfg()).digest


def test_a_declared_mapping_and_the_cifar_mapping():
    h = resolve_heads(
        cfg(heads=[{"name": "big", "labels": {"small": ["0", "1", "2"],
                                                "big": [str(i) for i in range(3, 10)]}}]).heads,
        tuple(str(i) for i in range(10)),
    )  # fmt: skip
    assert h.heads[0].table == (0, 0, 0, 1, 1, 1, 1, 1, 1, 1)
    cifar = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck")  # fmt: skip
    av = resolve_heads(cfg(heads=[{"name": "av", "labels": "animal_vehicle"}]).heads, cifar)
    assert av.heads[0].classes == ("animal", "vehicle")
    assert [cifar[i] for i, v in enumerate(av.heads[0].table) if v == 1] == [
        "airplane", "automobile", "ship", "truck"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "heads, message",
    [
        ([{"name": "digit"}], "has no labels"),
        ([{"name": "digit", "labels": "parity"}], "unknown label mapping 'parity'"),
        ([{"name": "digit", "labels": "classes", "weight": -1}], "greater than or equal to 0"),
        ([{"name": "a", "labels": "classes", "weight": 0},
          {"name": "b", "labels": "even_odd", "weight": 0}], "every head has weight 0"),
        ([{"name": "a", "labels": "classes"}, {"name": "a", "labels": "even_odd"}], "unique"),
        ([{"name": "a-b", "labels": "classes"}], "must be an identifier"),
        ([{"name": "a", "labels": {"x": ["0"]}}], "at least 2 labels"),
        ([{"name": "a", "labels": {"x": ["0"], "y": []}}], "list no class"),
    ],
)  # fmt: skip
def test_bad_heads_are_refused_with_the_key(heads, message):
    with pytest.raises(ValidationError, match=message):
        cfg(heads=heads)


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"a": ["0", "1"], "b": ["2"]}, r"gives no label to class\(es\) \['3'"),
        ({"a": ["0", "x"], "b": [str(i) for i in range(1, 10)]}, "maps class 'x'"),
        ({"a": ["0", "1"], "b": [str(i) for i in range(1, 10)]}, "under two labels"),
        ("animal_vehicle", "CIFAR-10's class names"),
    ],
)
def test_heads_that_do_not_fit_the_classes_fail_before_loading(labels, message):
    with pytest.raises(ConfigError, match=f"data.heads.0.labels.*{message}"):
        expected_input(cfg(heads=[{"name": "h", "labels": labels}]))


def test_the_loss_weighs_the_heads(two_heads):
    from bonsai.losses import cross_entropy

    d = two_heads
    logits = torch.randn(32, 12, generator=torch.Generator().manual_seed(0))
    y = d.train_y[:32]
    t = d.heads.targets(y)
    ce = torch.nn.functional.cross_entropy
    want = ce(logits[:, :10], t[:, 0]) + 0.5 * ce(logits[:, 10:], t[:, 1])
    assert torch.allclose(cross_entropy(logits, y, d.heads), want)


# ---------------------------------------------------------------------------------------------
# Every stage keeps every head


def test_two_heads_go_through_distill_prune_and_int8_within_tolerance(chain, two_heads):
    d = two_heads
    acc = {k: per_head(a, d) for k, a in chain.items()}
    # Both heads learned (chance: 10% and 50%).
    assert acc["teacher"]["digit"] > 90 and acc["teacher"]["parity"] > 90, acc
    assert acc["student"]["digit"] > 85 and acc["student"]["parity"] > 85, acc
    # Structured pruning really removed channels, and every head survived it.
    assert chain["pruned"].meta["model"]["params"] < chain["student"].meta["model"]["params"]
    assert acc["pruned"]["digit"] > 80 and acc["pruned"]["parity"] > 80, acc
    # int8 keeps each head within the stage's tolerance (2 points) of its fp32 parent.
    for head in ("digit", "parity"):
        assert acc["onnx"][head] - acc["int8"][head] <= 2.0 + 1e-9, acc
    assert chain["int8"].meta["accuracy_drop"] <= 2.0
    # Every artifact records the heads; the ONNX graphs have one named output per head.
    for art in chain.values():
        assert heads_from_meta(art.meta["model"]) == [("digit", 10), ("parity", 2)]
    for k in ("onnx", "int8"):
        outs = onnx.load(str(chain[k].file)).graph.output
        assert [o.name for o in outs] == ["digit", "parity"]


def test_evaluation_reports_each_head_and_the_single_task_models_it_replaces(
    chain, two_heads, tmp_path
):
    d = two_heads
    for k in ("pruned", "int8"):
        m = evaluate(chain[k], d, tmp_path / k, repeats=20, warmup=5, footprint=False).metrics
        assert {"accuracy_digit", "accuracy_parity"} <= set(m)
        assert m["accuracy"] == pytest.approx((m["accuracy_digit"] + m["accuracy_parity"]) / 2)
        # Two single-task models (same backbone, one head each) weigh nearly twice as much and
        # take nearly twice as long as the one model with two heads.
        assert m["bytes"] < m["single_task_bytes"] < 2 * m["bytes"], m
        assert m["single_task_bytes"] > 1.8 * m["bytes"], m
        assert m["single_task_latency_ratio"] > 1.3, m


def test_a_single_task_model_computes_exactly_its_head(chain, two_heads):
    model = load_torch(chain["pruned"])
    x = two_heads.test_x[:16]
    full = predict_logits(model, x)
    singles = single_task_torch(model, two_heads.heads, two_heads.input_shape)
    assert [predict_logits(s, x).shape[1] for s in singles] == [10, 2]
    torch.testing.assert_close(predict_logits(singles[0], x), full[:, :10])
    torch.testing.assert_close(predict_logits(singles[1], x), full[:, 10:])


def test_predictor_answers_for_every_head(chain, two_heads):
    from bonsai.predictor import Predictor

    out = Predictor(chain["int8"].path).predict(two_heads.raw_test[:50])
    y = two_heads.test_y.numpy()[:50]
    assert set(out) >= {"digit_index", "digit_name", "parity_index", "parity_name"}
    np.testing.assert_array_equal(out["class_index"], out["digit_index"])
    assert set(out["parity_name"]) <= {"even", "odd"}
    assert (out["parity_index"] == y % 2).mean() > 0.8


# ---------------------------------------------------------------------------------------------
# Mobile formats


def test_core_ml_package_loads_with_its_heads_and_metadata(chain, two_heads, tmp_path):
    import coremltools as ct

    art = run_stage("export.coreml", {}, two_heads, tmp_path / "cm", input=chain["pruned"])
    assert art.kind == "coreml" and open_artifact(art.path).digest == art.digest
    with zipfile.ZipFile(art.file) as z:
        z.extractall(tmp_path / "unzipped")
    package = tmp_path / "unzipped" / "model.mlpackage"
    assert (package / "Manifest.json").is_file()
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert [i.name for i in spec.description.input] == ["input"]
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 1, 8, 8]
    assert [o.name for o in spec.description.output] == ["digit", "parity"]
    meta = spec.description.metadata.userDefined
    assert meta["bonsai.source_digest"] == chain["pruned"].digest
    assert "even" in meta["bonsai.heads"]
    m = evaluate(art, two_heads, tmp_path / "ev", footprint=True).metrics
    assert "accuracy" not in m and m["runtime_bytes"] == 0  # cannot run here; iOS ships Core ML
    assert m["zipped_bytes"] < m["bytes"] == art.meta["coreml"]["package_bytes"]


def _litert_or_fail():
    from bonsai.litert import converter_python

    try:
        converter_python(None)
    except StageFailed:
        if os.environ.get("CI"):
            raise  # CI builds .venv-litert (make install): it must be there
        pytest.skip("no LiteRT converter environment (make install creates .venv-litert)")


def test_litert_export_matches_torch_and_is_measured_like_every_variant(chain, two_heads, tmp_path):
    _litert_or_fail()
    art = run_stage("export.litert", {}, two_heads, tmp_path / "lt", input=chain["pruned"])
    assert art.kind == "litert" and art.file.suffix == ".tflite"
    assert art.meta["parity_max_abs_diff"] <= 1e-3
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(art.file))
    it.allocate_tensors()
    assert [list(o["shape"]) for o in it.get_output_details()] in ([[1, 10], [1, 2]],
                                                                   [[1, 2], [1, 10]])  # fmt: skip
    m = evaluate(art, two_heads, tmp_path / "ev", repeats=20, warmup=5, footprint=True).metrics
    torch_acc = per_head(chain["pruned"], two_heads)
    assert m["accuracy_digit"] == pytest.approx(torch_acc["digit"], abs=0.3)
    assert m["accuracy_parity"] == pytest.approx(torch_acc["parity"], abs=0.3)
    assert m["latency_p50_ms"] > 0 and m["runtime_bytes"] > 1e6 and m["peak_rss_bytes"] > 1e6


def test_an_operator_a_mobile_format_lacks_fails_the_stage_naming_it(digits, tmp_path):
    bad = run_stage(
        "train",
        {"model": {"_target_": "tests.nets.ErfinvHead"}, "epochs": 1, **FAST},
        digits,
        tmp_path / "t",
    )
    with pytest.raises(StageFailed, match="Core ML conversion failed.*erfinv"):
        run_stage("export.coreml", {}, digits, tmp_path / "cm", input=bad)
    _litert_or_fail()
    with pytest.raises(StageFailed, match="LiteRT conversion failed.*erfinv"):
        run_stage("export.litert", {}, digits, tmp_path / "lt", input=bad)


def test_a_missing_litert_converter_is_refused_before_compute(monkeypatch, tmp_path):
    import bonsai.litert as lt
    from bonsai.stages import get_stage

    monkeypatch.setattr(lt, "DEFAULT_PYTHON", tmp_path / "nowhere" / "python")
    monkeypatch.delenv("BONSAI_LITERT_PYTHON", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    cls = get_stage("export.litert")
    with pytest.raises(ConfigError, match="litert-torch.*not installed.*make install"):
        cls.check_inputs(cls.Config(), "torch", False)


def test_accuracy_of_a_single_task_run_is_unchanged(digits):
    logits = np.eye(10)[digits.test_y.numpy()]
    assert accuracy(logits, digits.test_y.numpy(), None) == 100.0
