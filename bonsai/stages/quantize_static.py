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
from bonsai.onnx_utils import check_onnx_file
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
    summary = "static int8 quantization (QDQ, calibrated) in onnxruntime"

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
        meta = {k: v for k, v in ctx.input.meta.items() if k in ("model", "data")}
        return write_manifest(
            ctx.out_dir,
            "onnx",
            {**meta, "quantization": c.model_dump(), "calibration_samples": n},
        )
