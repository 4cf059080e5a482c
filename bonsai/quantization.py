"""onnxruntime's quantization tools, driven the same way by every quantization stage: graph
pre-processing, refusing an input that is already quantized, the weighted layers of a graph,
static QDQ quantization from calibration images, and the logit error a quantized model causes.

Nothing here knows about stages: their shared configs, the accuracy and speed checks of a
variant against its fp32 parent, and its manifest are in `bonsai.stages.quantize_common`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path
from typing import Any

import numpy as np

from bonsai.errors import GateError

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
    activation_symmetric: bool = False,
    op_types: list[str] | None = None,
    quant_format: str = "QDQ",
    nodes_to_exclude: list[str] | None = None,
    nodes_to_quantize: list[str] | None = None,
    range_overrides: dict[str, tuple[float, float]] | None = None,
    percentile: float | None = None,
    cache: Path | None = None,
    reduce_range: bool = False,
) -> Path:
    """onnxruntime static quantization (QDQ by default) of `model` into `out`.

    `activation_symmetric`: activation ranges centred on zero (onnxruntime's ActivationSymmetric;
    a uint8 activation's zero point is then 128); `op_types`: the op types to quantize (None:
    every op type onnxruntime's quantizer supports); `quant_format`: QDQ (Quantize/DequantizeLinear
    pairs around float ops, which onnxruntime fuses when it loads the model) or QOperator
    (quantized operators such as QLinearConv written into the file: smaller, no pairs);
    `range_overrides` {tensor: (rmin, rmax)} replace calibrated ranges (QAT's learned ranges);
    `percentile` sets the percentile calibrator's percentile;
    `cache` is a JSON file of calibrated ranges reused between calls on the same model, where this
    onnxruntime supports it (its `calibration_cache_path`), so that the accuracy-aware fallback
    calibrates once, not once per candidate; `reduce_range`: 7-bit weights (see
    `int8_pairs_saturate`).
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
    if activation_symmetric:
        extra["ActivationSymmetric"] = True
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
            quant_format=QuantFormat.QOperator if quant_format == "QOperator" else QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=qtype[activation_type],
            weight_type=qtype[weight_type],
            calibrate_method=methods[method],
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=nodes_to_exclude or None,
            nodes_to_quantize=nodes_to_quantize or None,
            extra_options=extra,
            reduce_range=reduce_range,
            **kwargs,
        )
    return out


# x86 CPU flags whose int8 dot-product instructions accumulate u8 x s8 products in 32 bits.
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_pairs_saturate(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether onnxruntime's u8 x s8 int8 kernels on this CPU saturate: on x86-64 without VNNI
    (AVX2, AVX-512F) they multiply with `vpmaddubsw`, which adds each pair of products into a
    signed 16-bit lane, so 2 x 255 x 127 = 64,770 clips at 32,767 and a layer's outputs come out
    wrong (onnxruntime's quantization docs: "try reduce_range"). With 7-bit weights
    (`reduce_range`, |w| <= 64) a pair stays within 32,640. ARM's and VNNI's dot products
    accumulate in 32 bits: no saturation there.

    Measured on an AMD EPYC with AVX2 only, 8-bit weights: a digits CNN's QAT int8 3.5 points
    below its parent (tolerance 2), a CNN with an outlier channel 10.6 points after QAT (1.9-2.0
    on a VNNI machine), and static int8 needed a third float layer; with 7-bit weights all were
    as on the VNNI machine (tests/unit/test_quantize.py).

    `cpuinfo`, `machine`: /proc/cpuinfo's text and platform.machine() (for tests); an x86 CPU
    whose flags cannot be read counts as saturating (7-bit weights are right on every CPU, only
    a little less precise)."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in {"x86_64", "amd64", "i386", "i686", "x86"}:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return True
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return not (_VNNI_FLAGS & set(line.split(":", 1)[-1].split()))
    return True


def resolve_reduce_range(value: bool | str) -> bool:
    """A stage's `reduce_range` setting as the bool the quantizer takes: `auto` is
    `int8_pairs_saturate()` of the machine that builds (and measures) the model."""
    return int8_pairs_saturate() if value == "auto" else bool(value)


def logit_error(q: np.ndarray, ref: np.ndarray) -> float:
    """Relative squared error of logits [N, K]: ||q - ref||^2 / ||ref||^2 (0: identical)."""
    den = float(np.square(ref).sum()) or 1.0
    return float(np.square(q - ref).sum()) / den
