"""`quantize.static`: onnxruntime static int8 quantization (QDQ), calibrated on training images,
accuracy-aware.

The model is pre-processed first (shape inference + graph optimization): without it, exported
graphs can keep nodes that block conv fusion and the int8 model runs slower (measured on the 2-core reference machine).

Accuracy-aware: when the all-int8 model falls further below its fp32 parent than `tolerance`
allows on the validation split, a per-layer sensitivity analysis quantizes each weighted layer
(Conv, Gemm, MatMul) alone and measures the validation accuracy and the logit error it causes. Layers are then kept in
float, most sensitive first, until the model is within tolerance (at most `max_float_layers`);
otherwise the stage fails naming the best it reached. The analysis is written into the artifact
folder as `sensitivity.csv` and `sensitivity.png`; the chosen layers are listed in the manifest
(`float_layers`). Calibration runs once and its ranges are reused for every candidate.

Both the choice and the gate use the validation split (`data.val_size`, held out of the
training images), never the test split: choosing float layers by the test images would fit the
choice to them, and the test accuracy the evaluator reports would no longer be an unbiased
estimate. Every accuracy in `sensitivity.csv`, `sensitivity.png` and the manifest's
`fallback_steps` and `int8_all_layers_accuracy` is the validation split's; the manifest's
`accuracy_drop` and `parent_accuracy` are the chosen model's on the test split (what the tables
report), `val_accuracy_drop` and `parent_val_accuracy` on the validation split.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from bonsai.artifacts import Artifact
from bonsai.errors import GateError
from bonsai.metrics import accuracy
from bonsai.quant_search import SearchConfig, keep, search
from bonsai.quantization import (
    layer_nodes,
    logit_error,
    preprocess,
    quantize_qdq,
    refuse_quantized_input,
    resolve_reduce_range,
)
from bonsai.stages.base import Stage, StageContext
from bonsai.stages.quantize_common import (
    CalibrationConfig,
    QuantizeConfig,
    accuracy_and_drop,
    accuracy_check,
    accuracy_threads,
    calibration_images,
    logits_on,
    resolved_key_params,
    speed_guard,
    write_variant,
)


class QuantizeStaticConfig(QuantizeConfig, CalibrationConfig):
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True  # one scale per output channel of each weight
    activation_type: Literal["uint8", "int8"] = (
        "uint8"  # u8 activations x s8 weights: x86's fast path
    )
    weight_type: Literal["int8", "uint8"] = "int8"
    preprocess: bool = True
    # When int8 misses the tolerance: keep up to this many layers (Conv/Gemm/MatMul) in float,
    # most sensitive first. 0: no fallback, the stage fails at once.
    max_float_layers: int = Field(default=4, ge=0, strict=True)
    # Search the settings instead of using the ones above (bonsai/quant_search.py): per-channel
    # or per-tensor weights, symmetric activations, calibration method, op types, float
    # fallback; the winner by `objective` within `tolerance`. null: quantize once, as set above.
    search: SearchConfig | None = None


class QuantizeStatic(Stage):
    kind = "quantize.static"
    Config = QuantizeStaticConfig
    consumes = ("onnx",)
    produces = "onnx"

    @classmethod
    def key_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        return resolved_key_params(params)

    def run(self, ctx: StageContext) -> Artifact:
        c: QuantizeStaticConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        src = ctx.input.file
        refuse_quantized_input(src, self.kind)
        calib = calibration_images(ctx, c.calibration_samples, c.calibration_batch)
        out = ctx.out_dir / "model.onnx"
        y, heads = ctx.data.val_y.numpy(), ctx.data.heads
        with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp_:
            tmp = Path(tmp_)
            model_in = preprocess(src, tmp / "pre.onnx") if c.preprocess else src

            def quantize(dst: Path, **kw) -> Path:
                return quantize_qdq(
                    model_in,
                    dst,
                    calib,
                    batch=c.calibration_batch,
                    method=c.calibrate_method,
                    per_channel=c.per_channel,
                    activation_type=c.activation_type,
                    weight_type=c.weight_type,
                    reduce_range=resolve_reduce_range(c.reduce_range),
                    cache=tmp / "calibration.json",
                    **kw,
                )

            # Decided on the validation split; the test split's numbers are only recorded.
            parent = {split: logits_on(src, ctx, split) for split in ("val", "test")}
            if c.search is not None:
                found = _search(c, ctx, src, model_in, calib, tmp, out)
                chosen = {split: logits_on(out, ctx, split) for split in ("val", "test")}
                numbers = accuracy_check(c, parent, chosen, ctx, "int8 (static, searched)")
                guard = speed_guard(src, out, ctx, c.min_speedup, "int8 (static, searched)")
                return write_variant(ctx, c, numbers, guard, **found)
            fp32 = accuracy(parent["val"], y, heads)
            quantize(out)
            # multi-task: the drop is the worst head's
            acc, drop = accuracy_and_drop(parent["val"], logits_on(out, ctx), ctx)
            meta: dict[str, Any] = {"float_layers": [], "float_nodes": []}
            meta["reduce_range"] = resolve_reduce_range(c.reduce_range)
            if not c.within_tolerance(drop, fp32):
                if c.max_float_layers == 0:
                    test_acc, test_drop = accuracy_and_drop(
                        parent["test"], logits_on(out, ctx, "test"), ctx, "test"
                    )
                    raise GateError(
                        f"int8 accuracy {acc:.2f}% vs {fp32:.2f}% for its fp32 input on the "
                        f"{len(y)} validation images: a drop of {drop:.2f} points, above "
                        f"{c.describe_tolerance(fp32)} (the test split, which only reports: "
                        f"{test_acc:.2f}%, a drop of {test_drop:.2f} points); try "
                        "max_float_layers > 0 (keep the most sensitive layers in float), "
                        + _advice(c)
                    )
                meta |= _fallback(c, ctx, quantize, model_in, parent["val"], fp32, acc, drop, tmp)
            chosen = {split: logits_on(out, ctx, split) for split in ("val", "test")}
            numbers = accuracy_check(c, parent, chosen, ctx, "int8 (static)")
            guard = speed_guard(src, out, ctx, c.min_speedup, "int8 (static)")
        return write_variant(ctx, c, numbers, guard, calibration_samples=len(calib), **meta)


def _search(
    c: QuantizeStaticConfig,
    ctx: StageContext,
    src: Path,
    model_in: Path,
    calib: np.ndarray,
    tmp: Path,
    out: Path,
) -> dict[str, Any]:
    """The searched int8 model at `out`; its manifest entries (bonsai/quant_search.py)."""
    assert c.search is not None
    s = c.search
    res = search(
        model_in,
        src,
        calib,
        (ctx.data.val_x.numpy(), ctx.data.val_y.numpy()),  # decided on the validation split
        ctx.data.test_x[:1].numpy(),
        s,
        fixed=search_fixed(c),
        within=c.within_tolerance,
        max_float_layers=c.max_float_layers,
        work=tmp,
        heads=ctx.data.heads,
        threads=accuracy_threads(),
        log=lambda m: ctx.log(f"{ctx.name}: {m}"),
    )
    keep(res, out)
    w = res.winner
    return {
        "calibration_samples": len(calib),
        "float_layers": [
            r["layer"] for r in res.ranking if r["node"] in set(w.settings.float_nodes)
        ],
        "float_nodes": list(w.settings.float_nodes),
        "search_candidates": len(res.tried),
        "search_settings": w.settings.as_dict(),
        "search_objective": s.objective,
        "search_decision_accuracy_drop": w.drop,
        "search_table": [t.row() for t in res.tried],
        "reduce_range": search_fixed(c)["reduce_range"],
    }


def search_fixed(c: QuantizeStaticConfig) -> dict[str, Any]:
    """The stage settings a search keeps fixed (with `search_settings`, all a file needs)."""
    return {
        "batch": c.calibration_batch,
        "activation_type": c.activation_type,
        "weight_type": c.weight_type,
        "reduce_range": resolve_reduce_range(c.reduce_range),
    }


def _fallback(
    c: QuantizeStaticConfig,
    ctx: StageContext,
    quantize,
    model_in: Path,
    parent_logits: np.ndarray,
    fp32: float,
    acc_all: float,
    drop_all: float,
    tmp: Path,
) -> dict[str, Any]:
    """Per-layer sensitivity, then float layers most sensitive first until within tolerance.

    Every accuracy here is the validation split's (`parent_logits` are the fp32 parent's on it).
    Leaves the chosen model at `ctx.out_dir / "model.onnx"` and the analysis beside it; returns
    the manifest entries. Raises GateError naming the best it reached.
    """
    allowed = c.allowed_drop(fp32)
    assert allowed is not None
    ctx.log(
        f"{ctx.name}: int8 accuracy on the validation split is {drop_all:.2f} points below "
        f"fp32 {fp32:.2f}%, above {c.describe_tolerance(fp32)}: measuring each layer's "
        "sensitivity"
    )
    # Sensitivity: each layer quantized alone (the rest in float) -> its own damage.
    rows: list[dict[str, Any]] = []
    for i, layer in enumerate(layer_nodes(model_in)):
        alone = quantize(tmp / f"alone-{i}.onnx", nodes_to_quantize=[layer["node"]])
        logits = logits_on(alone, ctx)
        alone.unlink()
        a, d = accuracy_and_drop(parent_logits, logits, ctx)  # multi-task: the worst head's
        rows.append(
            {
                **layer,
                "accuracy_alone": a,
                "drop_alone": d,
                "logit_error_alone": logit_error(logits, parent_logits),
            }
        )
    # Most sensitive first: the accuracy it costs, ties broken by the logit error (small
    # validation splits give many layers the same accuracy).
    ranked = sorted(rows, key=lambda r: (-r["drop_alone"], -r["logit_error_alone"]))
    for rank, r in enumerate(ranked, 1):
        r["rank"] = rank
    steps: list[dict[str, Any]] = [{"float_layers": 0, "accuracy": acc_all, "drop": drop_all}]
    chosen: list[dict[str, Any]] | None = None
    out = ctx.out_dir / "model.onnx"
    for k in range(1, min(c.max_float_layers, len(ranked)) + 1):
        cand = quantize(tmp / "candidate.onnx", nodes_to_exclude=[r["node"] for r in ranked[:k]])
        a, d = accuracy_and_drop(parent_logits, logits_on(cand, ctx), ctx)
        steps.append({"float_layers": k, "accuracy": a, "drop": d})
        ctx.log(
            f"{ctx.name}: {k} layer(s) in float ({', '.join(r['layer'] for r in ranked[:k])}): "
            f"{a:.2f}% (a drop of {d:.2f} points)"
        )
        if c.within_tolerance(d, fp32):
            shutil.move(str(cand), out)
            chosen = ranked[:k]
            break
    for r in ranked:
        r["kept_float"] = chosen is not None and r in chosen
    _write_csv(ranked, ctx.out_dir / "sensitivity.csv")
    _plot(ranked, steps, fp32, allowed, ctx.out_dir / "sensitivity.png")
    if chosen is None:
        best = min(steps, key=lambda s: s["drop"])
        names = [r["layer"] for r in ranked[: best["float_layers"]]]
        raise GateError(
            f"int8 stays more than {c.describe_tolerance(fp32)} below fp32 {fp32:.2f}% on the "
            f"{len(parent_logits)} validation images: "
            f"all-int8 {acc_all:.2f}%; keeping up to {len(steps) - 1} most "
            f"sensitive layer(s) in float, the best reached was {best['accuracy']:.2f}% "
            f"(a drop of {best['drop']:.2f} points) with {best['float_layers']} float "
            f"layer(s){': ' + ', '.join(names) if names else ''}; try a larger "
            f"max_float_layers (now {c.max_float_layers}), " + _advice(c)
        )
    return {
        "float_layers": [r["layer"] for r in chosen],
        "float_nodes": [r["node"] for r in chosen],
        "int8_all_layers_accuracy": acc_all,
        "fallback_steps": steps,
        "sensitivity_files": ["sensitivity.csv", "sensitivity.png"],
    }


CSV_FIELDS = [
    "rank",
    "layer",
    "node",
    "op_type",
    "accuracy_alone",
    "drop_alone",
    "logit_error_alone",
    "kept_float",
]


def _write_csv(ranked: list[dict[str, Any]], path: Path) -> None:
    """One row per layer, most sensitive first: validation accuracy (%) with only this layer
    quantized, its drop below fp32 (points), the relative logit error, and whether it was kept
    in float."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in ranked:
            w.writerow(
                {
                    **{k: r[k] for k in CSV_FIELDS},
                    "accuracy_alone": f"{r['accuracy_alone']:.4f}",
                    "drop_alone": f"{r['drop_alone']:.4f}",
                    "logit_error_alone": f"{r['logit_error_alone']:.6g}",
                    "kept_float": int(r["kept_float"]),
                }
            )


def _plot(ranked, steps, fp32: float, allowed: float, path: Path) -> None:
    """Left: each layer's drop when quantized alone (kept-float layers in red). Right: accuracy
    as layers are kept in float, most sensitive first, against the tolerance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ranked)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, max(3.5, 0.25 * n + 1.5)), gridspec_kw={"width_ratios": [3, 2]}
    )
    order = ranked[::-1]  # most sensitive at the top
    left.barh(
        [r["layer"] for r in order],
        [r["drop_alone"] for r in order],
        color=["tab:red" if r["kept_float"] else "tab:blue" for r in order],
    )
    left.set_xlabel("validation accuracy drop with only this layer in int8 (points)")
    left.set_title("Layer sensitivity (red: kept in float)")
    left.tick_params(axis="y", labelsize=7)
    ks = [s["float_layers"] for s in steps]
    right.plot(ks, [s["accuracy"] for s in steps], "o-", label="int8 model")
    right.axhline(fp32, color="gray", lw=1, label="fp32 parent")
    right.axhline(fp32 - allowed, color="tab:red", ls="--", lw=1, label="tolerance")
    right.set_xticks(ks)
    right.set_xlabel("layers kept in float (most sensitive first)")
    right.set_ylabel("validation accuracy (%)")
    right.set_title("Accuracy-aware fallback")
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _advice(c: QuantizeStaticConfig) -> str:
    """What to try next, leaving out what the config already does."""
    tips = [f"calibrate_method={m}" for m in ("percentile", "entropy") if m != c.calibrate_method]
    tips.append("more calibration_samples")
    if not c.per_channel:
        tips.append("per_channel=true")
    tips.append("quantize.qat (quantization-aware fine-tuning)")
    return ", ".join(tips[:-1]) + " or " + tips[-1]
