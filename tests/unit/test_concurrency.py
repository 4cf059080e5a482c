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
        if not exporting.wait(timeout=30):
            errors.append(TimeoutError("the export thread never started"))
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
    # A deadlock would leave a thread running: join's timeout alone passes it silently.
    assert [t.is_alive() for t in threads] == [False, False], "a thread is stuck"
    assert errors == []
    assert sorted(p.name for p in tmp_path.glob("m*.onnx")) == ["m0.onnx", "m1.onnx", "m2.onnx"]


def test_training_while_another_thread_prepares_qat(synthetic):
    """QAT's torch.fx trace patches Module.__call__ process-wide: a stage training beside it
    failed with "module is not installed as a submodule" (pipeline=frontier: `scratch` beside
    `qat`), and the traced model recorded the other thread's calls."""
    from bonsai.qat import prepare_qat

    errors: list[BaseException] = []
    traced: list = []
    training = threading.Event()
    stop = threading.Event()

    def train():
        model = build_model({"name": "cnn", "width": 8, "depth": 2}, 1, 4)
        try:
            training.set()
            while not stop.is_set():
                fit(
                    model,
                    synthetic,
                    loss_fn=lambda logits, y, _i, _x: torch.nn.functional.cross_entropy(logits, y),
                    epochs=1,
                    lr=1e-3,
                    batch_size=8,
                    gen=torch.Generator().manual_seed(0),
                    progress=False,
                )
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    def trace_loop():
        if not training.wait(timeout=30):
            errors.append(TimeoutError("the training thread never started"))
        # A deep model: each trace takes long enough for the trainer to call into it.
        model = build_model({"name": "resnet_cifar", "depth": 32, "width": 0.25}, 1, 4).eval()
        try:
            for _ in range(40):
                traced.append(prepare_qat(model, (1, 8, 8)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=train), threading.Thread(target=trace_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [t.is_alive() for t in threads] == [False, False], "a thread is stuck"
    assert errors == []
    # Every trace is the same graph: none recorded a call of the trainer's model.
    sizes = {len(list(gm.graph.nodes)) for gm in traced}
    assert len(traced) == 40 and len(sizes) == 1, sizes
