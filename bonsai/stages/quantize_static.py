"""`quantize.static`: onnxruntime static int8 quantization (QDQ), calibrated on training images.

The model is pre-processed first (shape inference + graph optimization): without it, exported
graphs can keep nodes that block conv fusion and the int8 model runs slower (STACK_NOTES).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from bonsai.artifacts import Artifact, write_manifest
from bonsai.errors import GateError
from bonsai.evaluate import top1
from bonsai.onnx_utils import check_onnx_file, run_logits, session
from bonsai.stages.base import Stage, StageConfig, StageContext


class QuantizeStaticConfig(StageConfig):
    calibration_samples: int = Field(default=512, ge=1)  # training images used to fit ranges
    calibration_batch: int = Field(default=64, ge=1)
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True  # one scale per output channel of each weight
    activation_type: Literal["uint8", "int8"] = (
        "uint8"  # u8 activations x s8 weights: x86's fast path
    )
    weight_type: Literal["int8", "uint8"] = "int8"
    preprocess: bool = True
    # Fail the stage when int8 top-1 accuracy on the test split falls more than this many
    # percentage points below its fp32 input's. null disables the gate.
    max_accuracy_drop: float | None = Field(default=2.0, ge=0, le=100)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a tensor of images."""

    def __init__(self, name: str, x: np.ndarray, batch: int):
        self.batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):  # pragma: no cover - only some calibrators call it
        pass


class QuantizeStatic(Stage):
    kind = "quantize.static"
    Config = QuantizeStaticConfig
    consumes = ("onnx",)
    produces = "onnx"

    def run(self, ctx: StageContext) -> Artifact:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        c: QuantizeStaticConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        src = ctx.input.file
        check_onnx_file(src)
        rng = np.random.default_rng(ctx.seed)
        n = min(c.calibration_samples, len(ctx.data.train_x))
        idx = np.sort(rng.choice(len(ctx.data.train_x), size=n, replace=False))
        calib = ctx.data.train_x.numpy()[idx].astype(np.float32)

        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[c.calibrate_method]
        with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp:
            model_in = src
            if c.preprocess:
                model_in = Path(tmp) / "pre.onnx"
                quant_pre_process(str(src), str(model_in), skip_symbolic_shape=False)
            import onnxruntime as ort

            name = (
                ort.InferenceSession(str(model_in), providers=["CPUExecutionProvider"])
                .get_inputs()[0]
                .name
            )
            quantize_static(
                str(model_in),
                str(ctx.out_dir / "model.onnx"),
                _Reader(name, calib, c.calibration_batch),
                quant_format=QuantFormat.QDQ,
                per_channel=c.per_channel,
                activation_type=qtype[c.activation_type],
                weight_type=qtype[c.weight_type],
                calibrate_method=method,
                extra_options={"CalibTensorRangeSymmetric": False},
            )
        drop = accuracy_drop(src, ctx.out_dir / "model.onnx", ctx)
        if c.max_accuracy_drop is not None and drop["drop"] > c.max_accuracy_drop:
            raise GateError(
                f"int8 accuracy {drop['int8']:.2f}% vs {drop['fp32']:.2f}% for its fp32 "
                f"input on {drop['n']} test images: a drop of {drop['drop']:.2f} points, above "
                f"max_accuracy_drop={c.max_accuracy_drop:.2f} points; try " + _advice(c)
            )
        meta = {k: v for k, v in ctx.input.meta.items() if k in ("model", "data")}
        return write_manifest(
            ctx.out_dir,
            "onnx",
            {
                **meta,
                "quantization": c.model_dump(),
                "calibration_samples": n,
                "accuracy_drop": drop["drop"],
            },
        )


def _advice(c: QuantizeStaticConfig) -> str:
    """What to try next, leaving out what the config already does."""
    tips = [f"calibrate_method={m}" for m in ("percentile", "entropy") if m != c.calibrate_method]
    tips.append("more calibration_samples")
    if not c.per_channel:
        tips.append("per_channel=true")
    return ", ".join(tips[:-1]) + " or " + tips[-1]


def accuracy_drop(fp32: Path, int8: Path, ctx: StageContext) -> dict[str, float]:
    """Top-1 accuracy (percent) of the fp32 and int8 models on the test split, and the drop
    between them (points)."""
    y = ctx.data.test_y.numpy()
    acc = {
        name: top1(run_logits(session(path), ctx.data.test_x).argmax(1), y)
        for name, path in (("fp32", fp32), ("int8", int8))
    }
    return {**acc, "drop": acc["fp32"] - acc["int8"], "n": len(y)}
