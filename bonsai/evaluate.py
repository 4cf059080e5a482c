"""One evaluator for every stage output, so that all variants are measured the same way.

Metrics: accuracy on the test split in percent (deltas and drops in points), params, MACs (batch 1), bytes of the
model file on disk, bytes after zip deflate (unstructured sparsity only pays off there),
onnxruntime latency p50/p90 in ms at batch 1 with a fixed thread count, and for exported models
the maximum |onnxruntime - torch| logit difference measured at export. Torch models are timed in
onnxruntime too, through an export written to `work_dir`, so that every latency is comparable.
"""

from __future__ import annotations

import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonsai.artifacts import Artifact, load_torch
from bonsai.data import DataBundle
from bonsai.onnx_utils import export_onnx, measure_latency, run_logits, session
from bonsai.training import predict_logits


@dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: np.ndarray  # int64 [num_test], argmax class per test image
    latency_model: Path  # the ONNX file that was timed


def top1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent (every accuracy Bonsai reports is in percent; deltas in points)."""
    return 100.0 * float((np.asarray(predictions) == np.asarray(labels)).mean())


def zipped_bytes(path: Path) -> int:
    """Size of `path` compressed with zip deflate (level 9), as it would ship in an app bundle."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(path, arcname=path.name)
    return buf.getbuffer().nbytes


def _export_atomically(model, input_shape: tuple[int, ...], work_dir: Path) -> Path:
    """`work_dir/latency.onnx`, written under a temporary name and renamed into place: a reader
    (or a kill, or a full disk) never sees half a file."""
    final = work_dir / "latency.onnx"
    tmp = work_dir / f".tmp-latency-{os.getpid()}-{threading.get_ident()}.onnx"
    try:
        export_onnx(model, input_shape, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def evaluate(
    artifact: Artifact,
    data: DataBundle,
    work_dir: Path,
    *,
    threads: int = 1,
    warmup: int = 20,
    repeats: int = 200,
    batch_size: int = 256,
) -> Evaluation:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    mm = artifact.meta["model"]
    if artifact.kind == "torch":
        model = load_torch(artifact)
        preds = predict_logits(model, data.test_x, batch_size).argmax(1).numpy()
        latency_model = _export_atomically(model, tuple(mm["input_shape"]), work_dir)
    else:
        latency_model = artifact.file
        preds = None
    sess = session(latency_model, threads=threads)
    if preds is None:
        preds = run_logits(sess, data.test_x, batch_size).argmax(1)
    metrics: dict[str, float] = {
        "accuracy": top1(preds, data.test_y.numpy()),
        "params": float(mm["params"]),
        "macs": float(mm["macs"]),
        "bytes": float(artifact.file.stat().st_size),
        "zipped_bytes": float(zipped_bytes(artifact.file)),
        **measure_latency(sess, data.test_x[:1].numpy(), warmup=warmup, repeats=repeats),
    }
    # Measured by the stage itself: export parity; a quantized variant's accuracy drop and its
    # speed guard against its fp32 parent (speedup ratio, and 1/0 for at least `min_speedup`).
    for key in ("parity_max_abs_diff", "accuracy_drop", "speedup_vs_parent", "speed_guard_ok"):
        if key in artifact.meta:
            metrics[key] = float(artifact.meta[key])
    return Evaluation(metrics, preds.astype(np.int64), latency_model)
