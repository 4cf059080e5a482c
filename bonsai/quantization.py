"""What every quantization stage shares: the accuracy tolerance, the speed guard, calibration
data, and onnxruntime's quantization tools driven the same way.

The four quantized variants (`quantize.static`, `quantize.dynamic`, `quantize.fp16`,
`quantize.qat`) are each checked twice against their fp32 parent before they are handed on:

- accuracy: top-1 on the test split may fall at most `tolerance` below the parent's, in points
  (`tolerance_mode: absolute`) or in percent of the parent's accuracy (`relative`); the stage
  fails otherwise (`quantize.static` first tries keeping its most sensitive layers in float);
- speed: the variant's batch-1 latency is measured against the parent's in the same process, in
  alternating rounds, with one onnxruntime thread. A variant less than `min_speedup` times
  faster is marked `speed_guard_ok=0` (and logged), never failed: int8 is not automatically
  faster (dynamic int8 convolutions run several times slower than fp32 here, STACK_NOTES).
"""

from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bonsai.errors import GateError
from bonsai.metrics import accuracy, head_accuracies, worst_drop
from bonsai.onnx_utils import measure_latency_paired, run_logits, session

if TYPE_CHECKING:  # the stages import this module; importing them here would be a cycle
    from bonsai.stages.base import StageContext
    from bonsai.stages.quantize_static import QuantizeConfig

# Speed guard: alternating rounds of batch-1 runs, parent then variant, after warm-up. 10 x 20
# runs each keeps the guard under ~5 s for a 12 ms model (resnet18 at 32x32) and gives medians
# whose ratio is stable to a few percent on this 2-core machine.
GUARD_ROUNDS = 10
GUARD_PER_ROUND = 20
GUARD_WARMUP = 10

# Ops that mark a graph as already quantized (QDQ, dynamic int8, QOperator) - quantizing it again
# would stack a second set of rounding errors on the first.
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "DynamicQuantizeMatMul",
}
# Layers: the ops that carry weights, whose quantization the accuracy-aware fallback can undo.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def calibration_images(ctx: StageContext, n: int, batch: int) -> np.ndarray:
    """Up to `n` training images [n, C, H, W] float32, a seeded sample without replacement,
    trimmed to whole batches of `batch` (onnxruntime's percentile and entropy calibrators stack
    the batches and fail on a short last one)."""
    rng = np.random.default_rng(ctx.seed)
    n = min(n, len(ctx.data.train_x))
    if n > batch:
        n -= n % batch
    idx = np.sort(rng.choice(len(ctx.data.train_x), size=n, replace=False))
    return np.ascontiguousarray(ctx.data.train_x.numpy()[idx], dtype=np.float32)


class CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over a tensor of images."""

    def __init__(self, name: str, x: np.ndarray, batch: int):
        self.batches = [{name: x[i : i + batch]} for i in range(0, len(x), batch)]
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def input_name(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's `quant_pre_process` (shape inference + graph optimization): without it,
    exported graphs can keep nodes that block conv fusion and the int8 model runs slower."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    return dst


def refuse_quantized_input(path: Path, kind: str) -> None:
    """A quantization stage takes an fp32 model: refuse one that is already quantized or fp16,
    before any work (its accuracy and speed would be measured against the wrong parent)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = sorted({n.op_type for n in m.graph.node} & QUANTIZED_OPS)
    fp16 = [i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    if ops or fp16:
        what = f"quantized ops {ops}" if ops else f"{len(fp16)} float16 initializers"
        raise GateError(
            f"{kind} takes an fp32 ONNX model, but its input {str(path)!r} already holds {what}; "
            "set the stage's `input` to an export.onnx stage (the fp32 parent)"
        )


def layer_nodes(path: Path) -> list[dict[str, str]]:
    """The weighted nodes (Conv, Gemm, MatMul with a constant weight) of an ONNX model, in graph
    order: {node, op_type, layer}. `layer` names the torch module when the exporter kept the
    parameter name on the weight (e.g. `layer1.0.conv1`), else the node name."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = []
    for n in m.graph.node:
        if n.op_type not in LAYER_OPS or len(n.input) < 2:
            continue
        weight = n.input[1]
        if weight not in inits:
            continue
        layer = weight.removesuffix(".weight") if weight.endswith(".weight") else n.name
        out.append({"node": n.name, "op_type": n.op_type, "layer": layer})
    return out


def quantize_qdq(
    model: Path,
    out: Path,
    calib: np.ndarray,
    *,
    batch: int = 64,
    method: str = "minmax",
    per_channel: bool = True,
    activation_type: str = "uint8",
    weight_type: str = "int8",
    nodes_to_exclude: list[str] | None = None,
    nodes_to_quantize: list[str] | None = None,
    range_overrides: dict[str, tuple[float, float]] | None = None,
    percentile: float | None = None,
    cache: Path | None = None,
) -> Path:
    """onnxruntime static QDQ quantization of `model` into `out`.

    `range_overrides` {tensor: (rmin, rmax)} replace calibrated ranges (QAT's learned ranges);
    `percentile` sets the percentile calibrator's percentile;
    `cache` is a JSON file of calibrated ranges reused between calls on the same model, where this
    onnxruntime supports it (its `calibration_cache_path`), so that the accuracy-aware fallback
    calibrates once, not once per candidate.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    extra: dict[str, Any] = {"CalibTensorRangeSymmetric": False}
    if percentile is not None and method == "percentile":
        extra["CalibPercentile"] = percentile  # onnxruntime's default: 99.999
    if range_overrides:
        extra["TensorQuantOverrides"] = {
            name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
            for name, (lo, hi) in range_overrides.items()
        }
    kwargs: dict[str, Any] = {}
    if (
        cache is not None
        and "calibration_cache_path" in inspect.signature(_quantize_static).parameters
    ):
        kwargs["calibration_cache_path"] = str(cache)
    # The percentile and entropy calibrators print their progress to stdout: keep the run's
    # output to what the user asked for. (stdout is process-wide: only swapped when needed.)
    quiet = contextlib.redirect_stdout(io.StringIO()) if method != "minmax" else None
    with quiet or contextlib.nullcontext():
        _quantize_static(
            str(model),
            str(out),
            CalibrationReader(input_name(model), calib, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=qtype[activation_type],
            weight_type=qtype[weight_type],
            calibrate_method=methods[method],
            nodes_to_exclude=nodes_to_exclude or None,
            nodes_to_quantize=nodes_to_quantize or None,
            extra_options=extra,
            **kwargs,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Measuring a variant against its parent


def accuracy_threads() -> int:
    """Threads for accuracy passes: the torch threads the flow gave this stage (its share of the
    cores). Latency is always measured with one thread."""
    return max(1, torch.get_num_threads())


def logits_on_test(path: Path, ctx: StageContext) -> np.ndarray:
    """Logits [num_test, K] of an ONNX model on the test split."""
    return run_logits(session(path, threads=accuracy_threads()), ctx.data.test_x)


def accuracy_check(
    c: QuantizeConfig,
    parent_logits: np.ndarray,
    variant_logits: np.ndarray,
    ctx: StageContext,
    what: str,
) -> dict[str, float]:
    """The variant's test accuracy and drop against its parent; raise GateError beyond the
    tolerance, with the numbers and what to try. Multi-task: the drop is the largest of any
    head's (every head must stay within the tolerance), accuracy the heads' mean."""
    y, heads = ctx.data.test_y.numpy(), ctx.data.heads
    parent_accuracy = accuracy(parent_logits, y, heads)
    acc = accuracy(variant_logits, y, heads)
    drop = worst_drop(parent_logits, variant_logits, y, heads)
    allowed = c.allowed_drop(parent_accuracy)
    if allowed is not None and drop > allowed + 1e-9:
        per_head = ""
        if heads is not None:
            before = head_accuracies(parent_logits, y, heads)
            after = head_accuracies(variant_logits, y, heads)
            per_head = (
                " (per head: "
                + ", ".join(f"{n} {after[n]:.2f}% vs {before[n]:.2f}%" for n in heads.names)
                + ")"
            )
        raise GateError(
            f"{what} accuracy {acc:.2f}% vs {parent_accuracy:.2f}% for its fp32 parent on "
            f"{len(variant_logits)} test images{per_head}: a drop of {drop:.2f} points, above "
            f"{c.describe_tolerance(parent_accuracy)}"
        )
    return {"accuracy": acc, "parent_accuracy": parent_accuracy, "accuracy_drop": drop}


def speed_guard(
    parent: Path,
    variant: Path,
    ctx: StageContext,
    min_speedup: float,
    what: str,
) -> dict[str, float]:
    """Batch-1 latency of `variant` against `parent` in alternating rounds, one onnxruntime
    thread each. Returns {speedup_vs_parent, speed_guard_ok (1/0), parent_p50_ms,
    variant_p50_ms}; logs the verdict through `ctx.log` (a failure says so plainly)."""
    x1 = ctx.data.test_x[:1].numpy()
    lat = measure_latency_paired(
        {"parent": session(parent, threads=1), "variant": session(variant, threads=1)},
        x1,
        rounds=GUARD_ROUNDS,
        per_round=GUARD_PER_ROUND,
        warmup=GUARD_WARMUP,
    )
    p, v = lat["parent"]["latency_p50_ms"], lat["variant"]["latency_p50_ms"]
    speedup = p / v
    ok = speedup >= min_speedup
    verdict = (
        f"{ctx.name}: speed guard {'ok' if ok else 'FAILED'}: {what} p50 {v:.4f} ms vs fp32 "
        f"parent {p:.4f} ms (batch 1, 1 thread, side by side): {speedup:.2f}x"
    )
    if ok:
        ctx.log(f"{verdict}, at least min_speedup={min_speedup:g}")
    else:
        ctx.log(
            f"{verdict}, below min_speedup={min_speedup:g}; this variant does not pay for "
            "itself in latency and is marked speed_guard_ok=0"
        )
    return {
        "speedup_vs_parent": speedup,
        "speed_guard_ok": 1.0 if ok else 0.0,
        "min_speedup": min_speedup,
        "parent_p50_ms": p,
        "variant_p50_ms": v,
    }


def parent_meta(ctx: StageContext) -> dict[str, Any]:
    """What a variant inherits from its input's manifest (architecture, data preparation)."""
    assert ctx.input is not None
    return {k: v for k, v in ctx.input.meta.items() if k in ("model", "data")}


def logit_error(q: np.ndarray, ref: np.ndarray) -> float:
    """Relative squared error of logits [N, K]: ||q - ref||^2 / ||ref||^2 (0: identical)."""
    den = float(np.square(ref).sum()) or 1.0
    return float(np.square(q - ref).sum()) / den
