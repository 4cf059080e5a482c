"""One evaluator for every stage output, so that all variants are measured the same way.

Metrics: accuracy on the test split in percent (deltas and drops in points; `accuracy` is what
every table reports), accuracy on the validation split (`val_accuracy`: what promotion and the
recipe search decide by), params, MACs (batch 1), bytes of the
model file on disk, bytes after zip deflate (unstructured sparsity only pays off there), sparsity
(percent of conv and linear weights that are exactly zero),
onnxruntime latency p50/p90 in ms at batch 1 with a fixed thread count, the deployable footprint
(the installed size of the runtime the variant needs, and the peak memory of one batch-1
inference in a fresh process: bonsai/measure/footprint.py), and for exported models
the maximum |onnxruntime - torch| logit difference measured at export. Torch models are timed in
onnxruntime too, through an export written to `work_dir`, so that every latency is comparable.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from bonsai.artifacts import Artifact
from bonsai.data import DataBundle
from bonsai.formats import Format, get_format, open_session
from bonsai.heads import heads_from_meta, predictions
from bonsai.measure import latency
from bonsai.measure.latency import measure_latency, measure_latency_paired
from bonsai.metrics import accuracy, head_accuracies
from bonsai.onnx_utils import export_onnx, run_logits
from bonsai.training import predict_logits


@dataclass
class Evaluation:
    metrics: dict[str, float]
    # int64 [num_test], argmax class per test image; multi-task: [num_test * heads], each
    # image's prediction for every head in turn
    predictions: np.ndarray
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


def _export_atomically(model, input_shape: tuple[int, ...], final: Path, heads=None) -> Path:
    """The ONNX export `final` (e.g. `work_dir/latency.onnx`), written under a temporary name and
    renamed into place: a reader (or a kill, or a full disk) never sees half a file."""
    from bonsai.safe_io import clear_for, temp_beside

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(final, final.suffix)  # exclusive, random name: no link planted there
    try:
        export_onnx(model, input_shape, tmp, heads=heads)
        clear_for(final, "file", "the evaluator's timed model")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _zipped_bytes(artifact: Artifact, fmt: Format) -> int:
    """The model file zipped; a file that is an archive already (Core ML's) as it is."""
    return artifact.file.stat().st_size if fmt.zipped else zipped_bytes(artifact.file)


def _sizes_only(artifact: Artifact, fmt: Format, footprint: bool) -> Evaluation:
    """A format nothing here can run (Core ML): its sizes only (as installed, and zipped), and
    the runtime it needs (Core ML: none, Apple's systems ship it). No accuracy or latency."""
    mm = artifact.meta["model"]
    metrics = {
        "params": float(mm["params"]),
        "macs": float(mm["macs"]),
        "bytes": float(fmt.size_bytes(artifact)),
        "zipped_bytes": float(_zipped_bytes(artifact, fmt)),
    }
    if footprint:
        from bonsai.measure.footprint import runtime_bytes

        metrics["runtime_bytes"] = float(runtime_bytes(artifact.kind))
    return Evaluation(metrics, np.zeros(0, dtype=np.int64), artifact.file)


def _single_task(artifact, model, sess, latency_model, heads, data, work_dir, threads, warmup):
    """What the separate single-task models a multi-task variant replaces would cost: one per
    head, same backbone, format and precision (`bonsai.heads.single_task_torch/_onnx`). Their
    bytes summed, and their batch-1 latencies summed, timed side by side with the multi-task
    model in alternating rounds (`single_task_latency_ratio`: their sum over the multi-task
    model's latency, measured in the same rounds)."""
    from bonsai.measure.single_task import single_task_onnx, single_task_torch

    mm = artifact.meta["model"]
    shape = tuple(mm["input_shape"])
    folder = work_dir / "single_task"
    folder.mkdir(exist_ok=True)
    if model is not None:
        from safetensors.torch import save

        singles = single_task_torch(model, heads, shape)
        if not singles:
            return {}
        sizes = [len(save({k: v.contiguous() for k, v in m.state_dict().items()})) for m in singles]
        paths = []
        for name, m in zip(heads.names, singles, strict=True):
            paths.append(_export_atomically(m, shape, folder / name / latency_model.name))
    else:
        paths = single_task_onnx(latency_model, heads, folder)
        sizes = [p.stat().st_size for p in paths]
    sessions = {"multi": sess}
    sessions.update({f"single{i}": open_session(p, threads) for i, p in enumerate(paths)})
    lat = measure_latency_paired(
        sessions, data.test_x[:1].numpy(), rounds=5, per_round=40, warmup=warmup
    )
    singles_ms = sum(lat[k]["latency_p50_ms"] for k in sessions if k != "multi")
    return {
        "single_task_bytes": float(sum(sizes)),
        "single_task_latency_ms": singles_ms,
        "single_task_latency_ratio": singles_ms / lat["multi"]["latency_p50_ms"],
    }


def weight_sparsity(model: nn.Module) -> float:
    """Percent of the conv and linear weights of a torch model that are exactly zero (biases and
    normalization parameters are not counted: pruning never zeroes them)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            w = m.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
    return 100.0 * zeros / max(total, 1)


# ONNX ops whose weights count, with (weight input index, zero-point input index or None).
_ONNX_WEIGHT_INPUTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "Conv": ((1, None),),
    "ConvTranspose": ((1, None),),
    "Gemm": ((0, None), (1, None)),
    "MatMul": ((0, None), (1, None)),
    "ConvInteger": ((1, 3),),
    "MatMulInteger": ((1, 3),),
    "QLinearConv": ((3, 5),),
    "QLinearMatMul": ((3, 5),),
}
# Ops an exporter may put between a weight initializer and the op that uses it.
_PASS_THROUGH = {"Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze"}


def onnx_weight_sparsity(path: Path) -> float:
    """Percent of the conv/gemm/matmul weight initializers of an ONNX model that are zero.

    Float weights count when they equal 0. Quantized weights (int8/uint8 behind a
    DequantizeLinear, or the weight input of QLinearConv/ConvInteger/...) count when their
    quantized value equals the zero point, i.e. when they dequantize to exactly 0. Inputs that
    are activations (not initializers) are not weights and are skipped.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    counted: dict[str, tuple[int, int]] = {}  # initializer name -> (zeros, size)

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def count(name: str, zp_name: str | None, axis: int = 1) -> None:
        q = array(name)
        if q is None or name in counted:
            return
        zero = np.zeros((), dtype=q.dtype)
        if zp_name:
            zp = array(zp_name)
            if zp is not None:
                zero = zp.reshape([zp.size if i == axis else 1 for i in range(q.ndim)])
                zero = zero if zp.size > 1 else zp.reshape(())
        counted[name] = (int((q == zero).sum()), int(q.size))

    def resolve(name: str, zp_name: str | None) -> None:
        for _ in range(4):  # follow a few shape-only ops back to the stored tensor
            if name in inits:
                count(name, zp_name)
                return
            node = producer.get(name)
            if node is None:
                return
            if node.op_type == "DequantizeLinear":
                attrs = {a.name: a.i for a in node.attribute if a.name == "axis"}
                zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
                if node.input[0] in inits:
                    count(node.input[0], zp, axis=attrs.get("axis", 1))
                return
            if node.op_type not in _PASS_THROUGH:
                return
            name = node.input[0]

    for node in graph.node:
        for w_idx, zp_idx in _ONNX_WEIGHT_INPUTS.get(node.op_type, ()):
            if len(node.input) <= w_idx or not node.input[w_idx]:
                continue
            zp = node.input[zp_idx] if zp_idx is not None and len(node.input) > zp_idx else None
            resolve(node.input[w_idx], zp or None)
    zeros = sum(z for z, _ in counted.values())
    total = sum(n for _, n in counted.values())
    return 100.0 * zeros / max(total, 1)


def evaluate(
    artifact: Artifact,
    data: DataBundle,
    work_dir: Path,
    *,
    threads: int = latency.THREADS,
    warmup: int = latency.WARMUP,
    repeats: int = latency.REPEATS,
    batch_size: int = 256,
    footprint: bool = True,
) -> Evaluation:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    mm = artifact.meta["model"]
    heads = data.heads
    fmt = get_format(artifact.kind)
    if not fmt.runs_here:
        return _sizes_only(artifact, fmt, footprint)
    if fmt.latency_file is not None:  # a torch module: timed through its ONNX export
        model = fmt.load_module(artifact)
        logits = predict_logits(model, data.test_x, batch_size).numpy()
        val_logits = predict_logits(model, data.val_x, batch_size).numpy()
        latency_model = _export_atomically(
            model, tuple(mm["input_shape"]), work_dir / fmt.latency_file, heads_from_meta(mm)
        )
        sparsity: float | None = weight_sparsity(model)
    else:
        latency_model = artifact.file
        model, logits, val_logits = None, None, None
        sparsity = onnx_weight_sparsity(artifact.file) if fmt.onnx_graph else None
    sess = open_session(latency_model, threads=threads)
    if logits is None or val_logits is None:
        logits = run_logits(sess, data.test_x, batch_size)
        val_logits = run_logits(sess, data.val_x, batch_size)
    y = data.test_y.numpy()
    preds = np.asarray(predictions(logits, heads)).reshape(-1)
    metrics: dict[str, float] = {
        # Multi-task: the mean over heads, and each head's as accuracy_<head>.
        "accuracy": accuracy(logits, y, heads),
        **{f"accuracy_{n}": a for n, a in head_accuracies(logits, y, heads).items()},
        # The validation split's, for decisions (multi-task: the mean over heads).
        "val_accuracy": accuracy(val_logits, data.val_y.numpy(), heads),
        "params": float(mm["params"]),
        "macs": float(mm["macs"]),
        "bytes": float(fmt.size_bytes(artifact)),
        "zipped_bytes": float(_zipped_bytes(artifact, fmt)),
        **({"sparsity": sparsity} if sparsity is not None else {}),  # % of weights exactly 0
        **measure_latency(sess, data.test_x[:1].numpy(), warmup=warmup, repeats=repeats),
    }
    if footprint:  # what it needs on the device: its runtime, and memory in a fresh process
        from bonsai.measure.footprint import peak_rss_bytes, runtime_bytes

        metrics["runtime_bytes"] = float(runtime_bytes(artifact.kind))
        metrics["peak_rss_bytes"] = float(
            peak_rss_bytes(
                artifact.kind, fmt.probe_path(artifact), tuple(mm["input_shape"]), threads
            )
        )
    # Only a torch module or an ONNX graph can be cut to one head here (a LiteRT file cannot:
    # its torch parent's row says it).
    if heads is not None and len(heads.heads) > 1 and (model is not None or fmt.onnx_graph):
        metrics.update(
            _single_task(
                artifact, model, sess, latency_model, heads,
                data, work_dir, threads, warmup,
            )
        )  # fmt: skip
    # Measured by the stage itself: export parity; a quantized variant's accuracy drop against
    # its fp32 parent on the test split (reported) and on the validation split (what its gate
    # decided on), and its speed guard (speedup ratio, and 1/0 for at least `min_speedup`); a
    # searched int8 variant: how many candidate settings its stage tried.
    for key in (
        "parity_max_abs_diff",
        "accuracy_drop",
        "val_accuracy_drop",
        "speedup_vs_parent",
        "speed_guard_ok",
        "search_candidates",
    ):
        if key in artifact.meta:
            metrics[key] = float(artifact.meta[key])
    return Evaluation(metrics, preds.astype(np.int64), latency_model)
