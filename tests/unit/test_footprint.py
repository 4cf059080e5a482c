"""The deployable footprint of a variant: the runtime it needs and the memory one batch-1
inference takes in a fresh process. Each number must move when what it measures moves."""

import pytest
import torch
from torch import nn

from bonsai.measure.evaluate import evaluate
from bonsai.measure.footprint import (
    FootprintError,
    installed_bytes,
    peak_rss_bytes,
    python_rss_bytes,
    runtime_bytes,
)
from bonsai.onnx_utils import export_onnx
from tests.helpers import run_stage


def test_runtimes_are_measured_from_what_pip_installed():
    ort, pt = runtime_bytes("onnx"), runtime_bytes("torch")
    assert 5e6 < ort < pt  # onnxruntime's wheel is a fraction of torch's
    assert ort == installed_bytes("onnxruntime")
    assert installed_bytes("no-such-distribution-bonsai") == 0
    with pytest.raises(ValueError, match="no runtime known for artifact kind 'tflite'"):
        runtime_bytes("tflite")


def _mlp(tmp_path, hidden: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    return export_onnx(model.eval(), (1, 8, 8), tmp_path / f"mlp{hidden}.onnx")


def test_peak_memory_grows_with_the_model_and_includes_the_interpreter(tmp_path):
    small = peak_rss_bytes("onnx", _mlp(tmp_path, 16), (1, 8, 8))
    big = peak_rss_bytes("onnx", _mlp(tmp_path, 200_000), (1, 8, 8))  # 52 MB of weights
    assert python_rss_bytes() < small
    assert big - small > 40e6, (small, big)


def test_a_model_the_runtime_cannot_load_names_the_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(FootprintError, match="measuring memory of broken.onnx failed"):
        peak_rss_bytes("onnx", bad, (1, 8, 8))


def test_every_evaluated_variant_gets_its_footprint(synthetic, tmp_path):
    art = run_stage("train", {"model": {"name": "cnn", "width": 8, "depth": 2}, "epochs": 1},
                    synthetic, tmp_path / "t")  # fmt: skip
    ev = evaluate(art, synthetic, tmp_path / "eval", repeats=10, warmup=1)
    assert ev.metrics["runtime_bytes"] == runtime_bytes("torch")
    # A torch variant's process imports torch: far more memory than onnxruntime needs.
    onnx_rss = peak_rss_bytes("onnx", ev.latency_model, (1, 8, 8))
    assert ev.metrics["peak_rss_bytes"] > onnx_rss + 50e6
    off = evaluate(art, synthetic, tmp_path / "eval2", repeats=10, warmup=1, footprint=False)
    assert "runtime_bytes" not in off.metrics and "peak_rss_bytes" not in off.metrics
