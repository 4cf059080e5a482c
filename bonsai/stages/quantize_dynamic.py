"""`quantize.dynamic`: onnxruntime dynamic int8 quantization (weights int8 ahead of time,
activations quantized on the fly at run time; no calibration data).

It suits models dominated by MatMul/Gemm (transformers, MLPs). On convolutional nets
onnxruntime's CPU provider runs the int8 convolutions as ConvInteger, which was several times
SLOWER than fp32 on this machine (resnet18: 3-5 ms against 0.7 ms, measured on the 2-core reference machine): the speed guard
measures it and marks such a variant `speed_guard_ok=0`. `op_types` can limit it to MatMul.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from bonsai.artifacts import Artifact
from bonsai.quantization import preprocess, refuse_quantized_input
from bonsai.stages.base import Stage, StageContext
from bonsai.stages.quantize_common import QuantizeConfig, check_and_write_variant

# onnxruntime's dynamic (IntegerOps) quantizers for CNN/MLP/RNN graphs.
DynamicOp = Literal["Conv", "MatMul", "Gather", "Attention", "LSTM"]


class QuantizeDynamicConfig(QuantizeConfig):
    # Op types to quantize; null: every type onnxruntime quantizes dynamically.
    op_types: list[DynamicOp] | None = Field(default=None, min_length=1)
    per_channel: bool = False  # one weight scale per output channel
    weight_type: Literal["int8", "uint8"] = "int8"
    preprocess: bool = True  # onnxruntime's quant_pre_process first


class QuantizeDynamic(Stage):
    kind = "quantize.dynamic"
    Config = QuantizeDynamicConfig
    consumes = ("onnx",)
    produces = "onnx"

    def run(self, ctx: StageContext) -> Artifact:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        c: QuantizeDynamicConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        src = ctx.input.file
        refuse_quantized_input(src, self.kind)
        out = ctx.out_dir / "model.onnx"
        with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp:
            model_in = preprocess(src, Path(tmp) / "pre.onnx") if c.preprocess else src
            quantize_dynamic(
                str(model_in),
                str(out),
                op_types_to_quantize=list(c.op_types) if c.op_types else None,
                per_channel=c.per_channel,
                weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[c.weight_type],
            )
        ops = [n.op_type for n in onnx.load(str(out)).graph.node]
        n_int = sum(op in ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul") for op in ops)
        if n_int == 0:
            ctx.log(
                f"{ctx.name}: no node was quantized (op_types={c.op_types or 'all'}); the "
                "model is the fp32 graph"
            )
        return check_and_write_variant(c, ctx, src, out, "dynamic int8", integer_nodes=n_int)
