"""What every quantization stage shares: its configs, its calibration images, and how a variant
is checked against its fp32 parent and recorded.

The four quantized variants (`quantize.static`, `quantize.dynamic`, `quantize.fp16`,
`quantize.qat`) are each checked twice against their fp32 parent before they are handed on:

- accuracy: top-1 on the validation split (`data.val_size`, held out of the training images)
  may fall at most `tolerance` below the parent's, in points (`tolerance_mode: absolute`) or in
  percent of the parent's accuracy (`relative`); the stage fails otherwise (`quantize.static`
  first tries keeping its most sensitive layers in float, choosing them on the validation split
  too). Multi-task: the drop is the worst head's, so every head must stay within the tolerance.
  The test split only reports: the manifest's `accuracy_drop` and `parent_accuracy` are the
  test split's (what the tables show), `val_accuracy_drop` and `parent_val_accuracy` what the
  gate decided on;
- speed: the variant's batch-1 latency is measured against the parent's in the same process, in
  alternating rounds, with one onnxruntime thread. A variant less than `min_speedup` times
  faster is marked `speed_guard_ok=0` (and logged), never failed: int8 is not automatically
  faster (dynamic int8 convolutions run several times slower than fp32 here, measured on the 2-core reference machine).

onnxruntime's quantization tools themselves, which know nothing of stages, are in
`bonsai.quantization`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from bonsai.artifacts import Artifact, write_manifest
from bonsai.errors import GateError
from bonsai.measure.latency import measure_latency_paired
from bonsai.metrics import accuracy, head_accuracies, worst_drop
from bonsai.onnx_utils import run_logits, session
from bonsai.stages.base import StageConfig, StageContext

# Speed guard: alternating rounds of batch-1 runs, parent then variant, after warm-up. 10 x 20
# runs each keeps the guard under ~5 s for a 12 ms model (resnet18 at 32x32) and gives medians
# whose ratio is stable to a few percent on this 2-core machine.
GUARD_ROUNDS = 10
GUARD_PER_ROUND = 20
GUARD_WARMUP = 10


class QuantizeConfig(StageConfig):
    """The knobs every quantization stage has: its accuracy tolerance and its speed guard."""

    # How far top-1 accuracy on the validation split may fall below the fp32 parent's: percentage
    # points (absolute) or percent of the parent's accuracy (relative; 1.0 at 90% allows 0.9
    # points). null: no accuracy check.
    tolerance: float | None = 2.0
    tolerance_mode: Literal["absolute", "relative"] = "absolute"
    # The variant must be at least this many times faster than its fp32 parent (batch 1, one
    # thread, measured side by side), else it is marked speed_guard_ok=0. 0 disables the guard.
    min_speedup: float = 1.0

    @field_validator("tolerance")
    @classmethod
    def _tolerance(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0 <= v <= 100):
            raise ValueError(
                "tolerance must be within [0, 100]: percentage points of accuracy "
                "(tolerance_mode=absolute) or percent of the fp32 parent's accuracy "
                "(tolerance_mode=relative); null disables the accuracy check"
            )
        return v

    @field_validator("min_speedup")
    @classmethod
    def _min_speedup(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(
                "min_speedup must be a finite ratio >= 0 (1.0: at least as fast as the fp32 "
                "parent; 1.5: 1.5x faster; 0 disables the speed guard)"
            )
        return v

    def allowed_drop(self, parent_accuracy: float) -> float | None:
        """The largest accuracy drop (points) this config accepts below `parent_accuracy` (%)."""
        if self.tolerance is None:
            return None
        if self.tolerance_mode == "absolute":
            return self.tolerance
        return parent_accuracy * self.tolerance / 100.0

    def within_tolerance(self, drop: float, parent_accuracy: float) -> bool:
        """Whether a drop of `drop` points below `parent_accuracy` (%) is accepted (the 1e-9
        absorbs float noise: a drop of exactly the tolerance passes)."""
        allowed = self.allowed_drop(parent_accuracy)
        return allowed is None or drop <= allowed + 1e-9

    def describe_tolerance(self, parent_accuracy: float | None = None) -> str:
        if self.tolerance_mode == "absolute":
            return f"tolerance={self.tolerance:g} points"
        text = f"tolerance={self.tolerance:g}% of the fp32 accuracy (tolerance_mode=relative"
        if parent_accuracy is not None:
            text += f": {self.allowed_drop(parent_accuracy):.2f} points"
        return text + ")"


class CalibrationConfig(StageConfig):
    """Calibration images, for the stages that fit activation ranges."""

    # Training images used to fit activation ranges (at most the training split's size,
    # trimmed to whole calibration batches).
    calibration_samples: int = Field(default=512, strict=True)
    calibration_batch: int = Field(default=64, ge=1, strict=True)
    # 7-bit weights: right where onnxruntime's int8 kernels saturate (x86 without VNNI, see
    # bonsai.quantization.int8_pairs_saturate), a little less precise elsewhere. auto: 7-bit on
    # such a machine only; the resolved value is part of the cache key and the manifest.
    reduce_range: bool | Literal["auto"] = "auto"

    @field_validator("calibration_samples")
    @classmethod
    def _samples(cls, v: int) -> int:
        if v < 1:
            raise ValueError(
                "calibration needs at least 1 sample: calibration_samples is the number of "
                "training images used to fit activation ranges (e.g. 512)"
            )
        return v


def resolved_key_params(params: dict[str, Any]) -> dict[str, Any]:
    """A calibrating stage's parameters for its cache key, `reduce_range: auto` resolved on this
    machine: a model built where int8 saturates differs from one built where it does not, and
    a store shared between the two machines must not hand one out for the other."""
    from bonsai.quantization import resolve_reduce_range

    value = params.get("reduce_range", "auto")
    if value == "auto" or isinstance(value, bool):
        return {**params, "reduce_range": resolve_reduce_range(value)}
    return params  # invalid: the config's validation names it


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


# ---------------------------------------------------------------------------------------------
# Measuring a variant against its parent


def accuracy_threads() -> int:
    """Threads for accuracy passes: the torch threads the flow gave this stage (its share of the
    cores). Latency is always measured with one thread."""
    return max(1, torch.get_num_threads())


Split = Literal["val", "test"]
SPLIT_NAME = {"val": "validation", "test": "test"}


def split_of(ctx: StageContext, split: Split) -> tuple[torch.Tensor, np.ndarray]:
    """(normalized images, labels) of the validation or the test split."""
    d = ctx.data
    return (d.val_x, d.val_y.numpy()) if split == "val" else (d.test_x, d.test_y.numpy())


def logits_on(path: Path, ctx: StageContext, split: Split = "val") -> np.ndarray:
    """Logits [N, K] of an ONNX model on the validation split (decisions) or the test split
    (reports)."""
    return run_logits(session(path, threads=accuracy_threads()), split_of(ctx, split)[0])


def logits_on_test(path: Path, ctx: StageContext) -> np.ndarray:
    """Logits [num_test, K] of an ONNX model on the test split."""
    return logits_on(path, ctx, "test")


def logits_on_splits(path: Path, ctx: StageContext) -> dict[str, np.ndarray]:
    """{"val": logits, "test": logits} of an ONNX model: what `accuracy_check` takes."""
    return {split: logits_on(path, ctx, split) for split in ("val", "test")}


def accuracy_and_drop(
    parent_logits: np.ndarray, logits: np.ndarray, ctx: StageContext, split: Split = "val"
) -> tuple[float, float]:
    """Accuracy of `logits` on `split` and its drop (points) below `parent_logits` there.
    Multi-task: the accuracy is the heads' mean, the drop the largest of any head's."""
    y, heads = split_of(ctx, split)[1], ctx.data.heads
    return accuracy(logits, y, heads), worst_drop(parent_logits, logits, y, heads)


def accuracy_check(
    c: QuantizeConfig,
    parent_logits: dict[str, np.ndarray],
    variant_logits: dict[str, np.ndarray],
    ctx: StageContext,
    what: str,
) -> dict[str, float]:
    """The variant's accuracy and drop against its parent, from their logits on each split
    ({"val": ..., "test": ...}). The tolerance is checked on the validation split: raise
    GateError beyond it, with both splits' numbers and what to try. Returns the test split's
    `accuracy`, `parent_accuracy`, `accuracy_drop` (reported) and the validation split's
    `val_accuracy`, `parent_val_accuracy`, `val_accuracy_drop` (decided on). Multi-task: the
    drop is the largest of any head's (every head must stay within the tolerance), accuracy the
    heads' mean."""
    heads = ctx.data.heads
    out: dict[str, float] = {}
    splits: tuple[tuple[Split, str], ...] = (("test", ""), ("val", "val_"))
    for split, prefix in splits:
        y = split_of(ctx, split)[1]
        acc, drop = accuracy_and_drop(parent_logits[split], variant_logits[split], ctx, split)
        out[f"{prefix}accuracy"] = acc
        out[f"parent_{prefix}accuracy"] = accuracy(parent_logits[split], y, heads)
        out[f"{prefix}accuracy_drop"] = drop
    if not c.within_tolerance(out["val_accuracy_drop"], out["parent_val_accuracy"]):
        y = split_of(ctx, "val")[1]
        per_head = ""
        if heads is not None:
            before = head_accuracies(parent_logits["val"], y, heads)
            after = head_accuracies(variant_logits["val"], y, heads)
            per_head = (
                " (per head: "
                + ", ".join(f"{n} {after[n]:.2f}% vs {before[n]:.2f}%" for n in heads.names)
                + ")"
            )
        raise GateError(
            f"{what} accuracy {out['val_accuracy']:.2f}% vs {out['parent_val_accuracy']:.2f}% "
            f"for its fp32 parent on the {len(y)} validation images{per_head}: a drop of "
            f"{out['val_accuracy_drop']:.2f} points, above "
            f"{c.describe_tolerance(out['parent_val_accuracy'])} (the test split, which only "
            f"reports: {out['accuracy']:.2f}% vs {out['parent_accuracy']:.2f}%)"
        )
    return out


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


# ---------------------------------------------------------------------------------------------
# Recording a variant


def parent_meta(ctx: StageContext) -> dict[str, Any]:
    """What a variant inherits from its input's manifest (architecture, data preparation)."""
    assert ctx.input is not None
    return {k: v for k, v in ctx.input.meta.items() if k in ("model", "data")}


def write_variant(
    ctx: StageContext,
    c: QuantizeConfig,
    acc: dict[str, float],
    guard: dict[str, float],
    /,
    **meta: Any,
) -> Artifact:
    """The variant's ONNX artifact in `ctx.out_dir`: what it inherits from its parent, its
    quantization config, its accuracy against the parent (`accuracy_check`'s result: the test
    split's as reported, the validation split's as decided on), the speed guard's entries and
    the stage's own `meta`."""
    return write_manifest(
        ctx.out_dir,
        "onnx",
        {
            **parent_meta(ctx),
            "quantization": c.model_dump(),
            "parent_accuracy": acc["parent_accuracy"],
            "accuracy_drop": acc["accuracy_drop"],
            "parent_val_accuracy": acc["parent_val_accuracy"],
            "val_accuracy_drop": acc["val_accuracy_drop"],
            "num_val": len(ctx.data.val_y),
            **meta,
            **guard,
        },
    )


def check_and_write_variant(
    c: QuantizeConfig, ctx: StageContext, src: Path, out: Path, what: str, /, **meta: Any
) -> Artifact:
    """The closing of a variant converted from the fp32 ONNX model `src` into `out`: accuracy
    check on the validation split (the test split's numbers recorded), speed guard against
    `src`, manifest."""
    acc = accuracy_check(c, logits_on_splits(src, ctx), logits_on_splits(out, ctx), ctx, what)
    guard = speed_guard(src, out, ctx, c.min_speedup, what)
    return write_variant(ctx, c, acc, guard, **meta)
