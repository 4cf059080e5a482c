"""Stages run in threads: training in one while another exports must not corrupt torch state."""

import threading

import torch

from bonsai.models import build_model
from bonsai.onnx_utils import export_onnx
from bonsai.training import fit


def test_training_while_another_thread_exports(synthetic, tmp_path):
    errors: list[BaseException] = []
    exporting = threading.Event()

    def export_loop():
        model = build_model({"name": "cnn", "width": 8, "depth": 2}, 1, 4)
        try:
            for i in range(3):
                exporting.set()
                export_onnx(model, (1, 8, 8), tmp_path / f"m{i}.onnx")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    def train():
        exporting.wait(timeout=30)
        model = build_model({"name": "cnn", "width": 8, "depth": 2}, 1, 4)
        try:
            fit(
                model,
                synthetic,
                loss_fn=lambda logits, y, _i, _x: torch.nn.functional.cross_entropy(logits, y),
                epochs=12,
                lr=1e-3,
                batch_size=8,
                gen=torch.Generator().manual_seed(0),
                progress=False,
            )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=export_loop), threading.Thread(target=train)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
