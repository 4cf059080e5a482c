"""What a user reads and ships: the Pareto plot is legible, ONNX files are lean, gate messages
give advice that applies."""

import numpy as np
import onnx
import pytest

from bonsai.measure.compare import FRONT_LABEL, pareto_figure, pareto_front
from bonsai.models import build_model, count_params
from bonsai.onnx_utils import export_onnx, run_logits, session

# The default run's variants: three of them within 3% of each other's latency and accuracy.
ROWS = [
    {"stage": "teacher", "kind": "train", "accuracy": 97.49, "latency_p50_ms": 0.44, "bytes": 44750792},
    {"stage": "student", "kind": "distill", "accuracy": 98.61, "latency_p50_ms": 0.0191, "bytes": 267040},
    {"stage": "onnx", "kind": "export.onnx", "accuracy": 98.61, "latency_p50_ms": 0.0192, "bytes": 263583},
    {"stage": "int8", "kind": "quantize.static", "accuracy": 98.61, "latency_p50_ms": 0.0158, "bytes": 76607},
]  # fmt: skip


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    fig = pareto_figure(ROWS, "default #1 · digits")
    fig.canvas.draw()
    yield fig
    plt.close(fig)


def test_plot_labels_neither_overlap_nor_leave_the_axes(figure):
    ax = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts if "\n" in t.get_text()]
    assert len(boxes) == len(ROWS)
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), "two labels print on top of each other"


def test_plot_draws_the_front_and_keeps_the_legend_off_the_data(figure):
    ax = figure.axes[0]
    [front] = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    xs = front.get_xdata()
    assert len(xs) >= 3 and max(xs) >= ax.get_xlim()[1]  # a staircase to the right edge
    legend = ax.get_legend()
    renderer = figure.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 > ax.get_window_extent(renderer).x1
    assert FRONT_LABEL in [t.get_text() for t in legend.get_texts()]
    # The teacher's marker is inside the axes, not cut at the edge.
    x0, x1 = ax.get_xlim()
    assert x0 < ROWS[0]["latency_p50_ms"] < x1 / 1.5


def test_pareto_front_keeps_only_undominated_variants():
    lat = np.array([1.0, 0.5, 0.2, 0.3, 2.0])
    acc = np.array([90.0, 95.0, 80.0, 79.0, 96.0])
    assert pareto_front(lat, acc) == [2, 1, 4]


def test_onnx_exports_carry_weights_not_exporter_metadata(tmp_path):
    model = build_model({"name": "cnn", "width": 12, "depth": 2}, 1, 10).eval()
    weights = 4 * count_params(model)  # fp32 bytes, ~10k parameters
    path = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    assert path.stat().st_size < weights + 6_000, (path.stat().st_size, weights)
    m = onnx.load(str(path))
    assert not any(n.metadata_props for n in m.graph.node)
    assert not any(n.doc_string for n in m.graph.node)
    import torch

    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_logits(session(path), x.numpy()) - ref).max() < 1e-5


def test_int8_gate_advice_never_suggests_what_is_already_set():
    from bonsai.stages.quantize_static import QuantizeStaticConfig, _advice

    advice = _advice(QuantizeStaticConfig(per_channel=True, calibrate_method="percentile"))
    assert "per_channel=true" not in advice and "calibrate_method=percentile" not in advice
    assert "calibrate_method=entropy" in advice
    assert "per_channel=true" in _advice(QuantizeStaticConfig(per_channel=False))
