"""`quantize.qat`: quantization-aware fine-tuning of a torch model, delivered as an int8 ONNX
(QDQ) model that onnxruntime runs and the evaluator measures like any other.

Why this path. `torch.ao.quantization` (eager/FX QAT) is deprecated and due for removal, and
torchao's PT2E flow with its x86 quantizer failed on resnet18 here ("Input partition has more
than one output node" at conv+add+relu, measured on the 2-core reference machine). What Bonsai ships is an onnxruntime QDQ
model anyway, so the training simulates onnxruntime's own int8 arithmetic and onnxruntime's
quantizer writes the model:

1. `bonsai.qat.prepare_qat`: BatchNorm folded into the convolutions, per-channel int8 fake
   quantization of the weights and uint8 fake quantization of the activations onnxruntime
   quantizes, with ranges calibrated on training images, then learned (see bonsai/qat.py).
2. Fine-tuning with `FinetuneConfig` (cross-entropy, or the `distill` loss with a teacher stage),
   starting from the fp32 weights.
3. The fine-tuned model without fake quantization is exported to fp32 ONNX and checked against
   torch (`parity_tol`): the parent of the int8 model in the speed guard.
4. Each fake quantizer's input is matched to the ONNX tensor holding the same values on a probe
   batch (names differ between torch.fx and the exporter; values do not), and onnxruntime's
   `quantize_static` (QDQ, per-channel int8 weights, uint8 activations) takes the learned ranges
   for those tensors (`TensorQuantOverrides`), calibrating only the tensors nothing matched.
   Weights are quantized by onnxruntime with the formula the training simulated.

The accuracy tolerance is against the input model (the fp32 parent before fine-tuning), on the
validation split (`bonsai.stages.quantize_common`); the test split's numbers are recorded; the
agreement between the int8 model and the torch fake-quant model shows how faithfully onnxruntime
reproduced what was trained.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from bonsai.artifacts import Artifact, load_torch
from bonsai.devices import describe
from bonsai.errors import GateError
from bonsai.heads import heads_from_meta, predictions
from bonsai.metrics import accuracy
from bonsai.onnx_utils import export_onnx, parity_max_abs_diff
from bonsai.qat import (
    QatError,
    act_quantizers,
    calibrate,
    learned_ranges,
    prepare_qat,
    probe_inputs,
    set_mode,
    strip_weight_quant,
)
from bonsai.quantization import preprocess, quantize_qdq, resolve_reduce_range
from bonsai.stages.base import Stage, StageContext
from bonsai.stages.common import FinetuneConfig
from bonsai.stages.quantize_common import (
    CalibrationConfig,
    QuantizeConfig,
    accuracy_check,
    calibration_images,
    logits_on_splits,
    resolved_key_params,
    speed_guard,
    write_variant,
)
from bonsai.training import predict_logits, seed_everything


class QuantizeQatConfig(FinetuneConfig, QuantizeConfig, CalibrationConfig):
    # Quantization-aware fine-tuning is the point of this stage: at least one epoch, and a
    # learning rate for adjusting trained weights, not for training from scratch.
    epochs: int = Field(default=3, ge=1, strict=True)
    lr: float = Field(default=1e-4, gt=0, allow_inf_nan=False)
    # Initial activation ranges: min/max over the calibration images, or the `percentile` and
    # its mirror (clips rare outliers). onnxruntime calibrates tensors no quantizer matched the
    # same way.
    calibrate_method: Literal["minmax", "percentile"] = "minmax"
    percentile: float = Field(default=99.99, gt=50, le=100)
    # How activation ranges evolve while the weights adapt: `tracked` follows each training
    # batch's min/max (moving average, constant `track_momentum`), `learned` trains them by
    # gradient with the weights (LSQ/PACT), `calibrated` keeps the initial calibration.
    ranges: Literal["tracked", "learned", "calibrated"] = "tracked"
    track_momentum: float = Field(default=0.01, gt=0, le=1)
    # `learned` only: learning-rate multiplier of the (log-space) ranges over the weights' lr.
    range_lr_scale: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    # Max |onnxruntime - torch| logit difference of the fp32 export, else the stage fails.
    parity_tol: float = Field(default=1e-4, gt=0)
    parity_samples: int = Field(default=256, ge=1)


class QuantizeQat(Stage):
    kind = "quantize.qat"
    Config = QuantizeQatConfig
    consumes = ("torch",)
    produces = "onnx"
    teacher = "optional"

    @classmethod
    def key_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        return resolved_key_params(params)

    def run(self, ctx: StageContext) -> Artifact:
        c: QuantizeQatConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        reduce_range = resolve_reduce_range(c.reduce_range)
        data = ctx.data
        y = data.test_y.numpy()
        shape = tuple(ctx.input.meta["model"]["input_shape"])
        model = load_torch(ctx.input)
        parent_logits = {
            "val": predict_logits(model, data.val_x).numpy(),
            "test": predict_logits(model, data.test_x).numpy(),
        }
        parent = accuracy(parent_logits["test"], y, data.heads)
        try:
            gm = prepare_qat(model, shape, c.range_lr_scale, reduce_range)
        except QatError as e:
            raise GateError(str(e)) from e
        calib = calibration_images(ctx, c.calibration_samples, c.calibration_batch)
        batches = [
            torch.from_numpy(calib[i : i + c.calibration_batch])
            for i in range(0, len(calib), c.calibration_batch)
        ]
        calibrate(gm, batches, c.percentile if c.calibrate_method == "percentile" else None)
        for q in act_quantizers(gm).values():
            if c.ranges != "learned":  # not trained by the optimizer
                q.theta_hi.requires_grad_(False)
                q.theta_lo.requires_grad_(False)
            q.track = c.track_momentum if c.ranges == "tracked" else None
        history = c.finetune(gm, ctx, seed_everything(ctx.seed))
        set_mode(gm, "quantize")
        fq_logits = predict_logits(gm, data.test_x).numpy()
        fq_preds = predictions(fq_logits, data.heads)
        ranges = learned_ranges(gm)
        strip_weight_quant(gm)
        set_mode(gm, "off")

        out = ctx.out_dir / "model.onnx"
        with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp_:
            tmp = Path(tmp_)
            heads = heads_from_meta(ctx.input.meta["model"])
            fp32 = export_onnx(gm, shape, tmp / "fp32.onnx", heads=heads)
            diff = parity_max_abs_diff(gm, fp32, data.test_x[: c.parity_samples])
            if not np.isfinite(diff) or diff > c.parity_tol:
                raise GateError(
                    f"QAT fp32 export parity failed: max |onnxruntime - torch| = {diff:.3g} over "
                    f"{min(c.parity_samples, len(y))} test images, above "
                    f"parity_tol={c.parity_tol:g}"
                )
            pre = preprocess(fp32, tmp / "pre.onnx")
            probe = data.train_x[:2]
            matches = match_tensors(pre, probe, probe_inputs(gm, probe))
            overrides = {t: ranges[q] for t, q in matches.items()}
            quantize_qdq(
                pre,
                out,
                calib,
                batch=c.calibration_batch,
                method=c.calibrate_method,
                per_channel=True,  # as WeightFakeQuant: per output channel, symmetric int8
                activation_type="uint8",  # as ActFakeQuant: asymmetric uint8
                weight_type="int8",
                reduce_range=reduce_range,  # as WeightFakeQuant
                range_overrides=overrides,
                percentile=c.percentile,
            )
            int8 = logits_on_splits(out, ctx)
            int8_logits = int8["test"]
            acc = accuracy_check(c, parent_logits, int8, ctx, "QAT int8")
            guard = speed_guard(fp32, out, ctx, c.min_speedup, "QAT int8")
        agreement = 100.0 * float((predictions(int8_logits, data.heads) == fq_preds).mean())
        used = sorted(set(matches.values()))
        ctx.log(
            f"{ctx.name}: learned ranges of {len(used)}/{len(ranges)} quantizers applied to "
            f"{len(overrides)} ONNX tensors; int8 {acc['accuracy']:.2f}% (fake-quant torch "
            f"{accuracy(fq_logits, y, data.heads):.2f}%, fp32 parent {parent:.2f}%), agreement {agreement:.1f}%"
        )
        meta: dict[str, Any] = {
            "calibration_samples": len(calib),
            "parity_max_abs_diff": diff,
            "fakequant_accuracy": accuracy(fq_logits, y, data.heads),
            "int8_fakequant_agreement": agreement,
            "learned_ranges": {
                t: {"quantizer": q, "lo": ranges[q][0], "hi": ranges[q][1]}
                for t, q in sorted(matches.items())
            },
            "quantizers_applied": len(used),
            "quantizers": len(ranges),
            "reduce_range": reduce_range,
            "history": history,
        }
        if ctx.teacher is not None:
            meta["teacher_digest"] = ctx.teacher.digest
        meta["trained_on"] = describe(ctx.device)  # the fine-tuning's (not in the cache key)
        return write_variant(ctx, c, acc, guard, **meta)


def match_tensors(model: Path, x: torch.Tensor, probes: dict[str, torch.Tensor]) -> dict[str, str]:
    """{ONNX tensor: quantizer} for every float tensor of `model` whose values on the probe
    batch `x` equal (to 1e-4 relative) the input a fake quantizer saw on the same batch.

    Tensors that only reshape a quantizer's input (flatten, view) match it too, which is right:
    onnxruntime quantizes them with the same range.
    """
    import onnx

    m = onnx.load(str(model))
    float_values = [
        v.name
        for v in list(m.graph.value_info) + list(m.graph.output)
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ]
    have = {o.name for o in m.graph.output}
    for name in float_values:
        if name not in have:
            m.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
            have.add(name)
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {inp: x.numpy()}), strict=True))
    values[inp] = x.numpy()
    by_size: dict[int, list[tuple[str, np.ndarray]]] = {}
    for q, probe in probes.items():
        by_size.setdefault(probe.numel(), []).append((q, probe.numpy().ravel()))
    out: dict[str, str] = {}
    for name, v in values.items():
        if not isinstance(v, np.ndarray) or v.dtype != np.float32:
            continue
        best, best_err = None, np.inf
        flat = v.ravel()
        for q, t in by_size.get(flat.size, []):
            err = float(np.abs(flat - t).max()) / (1.0 + float(np.abs(t).max()))
            if err < best_err:
                best, best_err = q, err
        if best is not None and best_err <= 1e-4:
            out[name] = best
    return out
