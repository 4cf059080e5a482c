"""The CIFAR-10 frontier bench: its hand-written baseline really builds (and shrinks) models, and
the doc's section is written from the bench's JSON, so text and table cannot disagree."""

import json

import numpy as np
import pytest
import torch

from bench import cifar_frontier as bench
from bench.baseline import cifar as baseline
from bonsai.measure.latency import measure_latency_paired


def test_the_baseline_builds_every_model_and_int8_shrinks_them(tmp_path):
    rng = np.random.default_rng(0)
    # Two classes a linear model can tell apart: bright or dark images.
    y = rng.integers(0, 2, 96)
    x = (rng.integers(0, 60, (96, 32, 32, 3)) + 150 * y[:, None, None, None]).astype(np.uint8)
    train = baseline.Images.from_nhwc(x[:64], y[:64])
    test = baseline.Images.from_nhwc(x[64:], y[64:])
    recipes = {n: baseline.Recipe(epochs=1, lr=0.05) for n in ("teacher", "scratch", "student")}
    recipes["pruned"] = baseline.Recipe(epochs=1, lr=0.01, warmup_epochs=0.5)
    built = {b.name: b for b in baseline.run(train, test, tmp_path, recipes, log=lambda m: None)}
    assert sorted(built) == sorted(
        f"{n}{s}" for n in ("teacher", "scratch", "student", "pruned") for s in ("", "_int8")
    )
    for b in built.values():
        assert b.onnx.is_file() and b.bytes == b.onnx.stat().st_size
        assert b.predictions.shape == (32,)
        assert b.accuracy == pytest.approx(100 * (b.predictions == y[64:]).mean())
        assert b.seconds > 0
    # Pruning removed channels; int8 files are about 4x smaller than their fp32 parents.
    assert built["pruned"].params < 0.75 * built["teacher"].params
    assert built["pruned"].macs < built["teacher"].macs
    for n in ("teacher", "scratch", "student", "pruned"):
        assert built[f"{n}_int8"].bytes < 0.45 * built[n].bytes
    assert built["scratch"].params < built["teacher"].params / 3  # ResNet-8 against ResNet-20


def test_the_baseline_augmentation_keeps_the_pixels_and_the_labels():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8)
    x = x.view(2, 3, 32, 32) + 1  # no black pixel: padding is the only source of zeros
    out = baseline.shift_flip(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):
        kept = out[i][out[i] > 0]
        assert set(kept.tolist()) <= set(x[i].flatten().tolist())
        assert len(kept) >= 3 * 24 * 24  # a shift of at most 4 pixels each way


def test_latency_rounds_alternate_their_order():
    order = []

    class Session:
        def __init__(self, name):
            self.name = name

        def get_inputs(self):
            return [type("I", (), {"name": "input"})()]

        def run(self, _, feed):
            order.append(self.name)

    lat = measure_latency_paired(
        {"a": Session("a"), "b": Session("b")},
        np.zeros((1, 1), np.float32),
        rounds=3,
        per_round=2,
        warmup=0,
    )
    assert order == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert sorted(lat) == ["a", "b"]


def _result():
    row = {
        "side": "bonsai", "kind": "train", "accuracy": 80.0, "accuracy_delta": 0.0,
        "params": 1000, "macs": 10_000, "bytes": 4000, "zipped_bytes": 3900,
        "latency_p50_ms": 0.5, "speedup": 1.0, "speedup_min": 1.0, "speedup_max": 1.0,
        "size_ratio": 1.0, "seconds": 100.0,
    }  # fmt: skip
    rows = [
        {**row, "stage": "teacher"},
        {**row, "stage": "teacher_onnx", "kind": "export.onnx", "speedup": 0.99,
         "speedup_min": 0.97, "speedup_max": 1.02},
        {**row, "stage": "teacher_int8", "kind": "quantize.static", "bytes": 1000,
         "size_ratio": 4.0, "speedup": 1.93, "speedup_min": 1.9, "speedup_max": 1.95},
        {**row, "stage": "hand: teacher", "side": "hand-written", "kind": "hand-written",
         "accuracy": 79.0},
        {**row, "stage": "hand: teacher_int8", "side": "hand-written", "kind": "hand-written",
         "accuracy": 78.5, "accuracy_delta": -0.5, "bytes": 1100, "size_ratio": 3.6,
         "speedup": 1.71, "speedup_min": 1.6, "speedup_max": 1.8},
    ]  # fmt: skip
    return {
        "date": "2026-12-07", "machine": "2 CPUs, x86_64", "command": "python bench/x.py",
        "config": {"scale": 0.2, "epochs": {"teacher": 6}, "rounds": 3, "repeats": 10},
        "rows": rows, "goals": [dict(zip(("goal", "bonsai", "baseline", "gap", "met"), g, strict=True))
                                for g in bench.goals(rows)],
        "search": [], "failed": [], "walls": {"bonsai frontier": 10.0},
    }  # fmt: skip


def test_goals_compare_both_measured_sides():
    g = {x[0]: x for x in bench.goals(_result()["rows"])}
    ours = g["within 1.0 pt: >= 5x smaller and >= 2.5x faster"]
    assert ours[1].startswith("teacher_int8: 4.0x smaller, 1.93x faster")
    assert ours[2].startswith("hand: teacher_int8: 3.6x smaller, 1.71x faster")
    assert ours[4] is False  # 4x < 5x
    assert g["teacher >= 87% within 30 min"][2] == "79.00% in 1.7 min"


def test_the_doc_section_is_rewritten_from_the_json(tmp_path):
    result = _result()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"intro\n{bench.BEGIN}\nold table 1.41x\n{bench.END}\nafter\n")
    path = tmp_path / "cifar10_frontier.json"
    path.write_text(json.dumps(result))
    bench.write_doc(json.loads(path.read_text()), path, doc)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{bench.END}\nafter\n")
    assert "1.41x" not in text
    assert "| teacher_int8 " in text and "1.93x" in text and "1.90-1.95" in text
    assert "0.99x (0.97-1.02 over the rounds)" in text  # the same-bytes pair states the noise
    assert "| hand: teacher_int8 " in text and "1.60-1.80" in text
    assert (tmp_path / "cifar10_frontier.png").stat().st_size > 10_000
    # Rendering twice gives the same text: nothing else is kept between the markers.
    bench.write_doc(result, path, doc)
    assert doc.read_text() == text


def test_a_doc_without_the_markers_is_refused(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no <!-- cifar_frontier: begin -->"):
        bench.write_doc(_result(), tmp_path / "x.json", doc)
    assert doc.read_text() == "no markers here\n"


def test_the_baseline_copies_the_frontier_recipes_from_the_config():
    stages = bench.frontier_stages()
    assert bench.scaled_epochs(1.0)["teacher"] == stages["teacher"]["epochs"] == 30
    assert bench.scaled_epochs(0.2) == {
        "teacher": 6, "qat": 1, "pruned": 2, "lowrank": 1, "student": 3, "scratch": 3
    }  # fmt: skip
    # Every knob the baseline's Recipe has is set by each of its four stages in conf/.
    fields = set(baseline.Recipe.__dataclass_fields__) - {"temperature", "alpha"}
    for name in bench.BASELINE_STAGES:
        assert fields <= set(stages[name]), (name, fields - set(stages[name]))
