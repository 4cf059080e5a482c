"""Fake quantization for quantization-aware training, in the arithmetic onnxruntime's QDQ int8
models run, so that what the network learns to tolerate is what it will get.

`prepare_qat(model, input_shape)` returns a `torch.fx.GraphModule` where

- every BatchNorm that follows a convolution is folded into it first (the ONNX exporter folds
  them too, so the exported weights ARE the fake-quantized ones);
- each Conv/Linear weight is fake-quantized per output channel, symmetric int8 in [-127, 127]
  with scale = max|w| / 127: onnxruntime's per-channel weight quantization (with
  `reduce_range`, 7-bit: [-64, 64], max|w| / 64, what onnxruntime's reduce_range writes, for
  CPUs whose int8 kernels saturate: `bonsai.quantization.int8_pairs_saturate`);
- each activation onnxruntime quantizes is fake-quantized per tensor to uint8 with a learned
  range [lo, hi] (lo <= 0 <= hi; scale = (hi - lo) / 255, zero point = round(-lo / scale)):
  the formula onnxruntime applies to a calibrated range. Where those tensors are: the model input,
  each layer's output, except before a ReLU (onnxruntime folds Conv+ReLU, quantizing after the
  ReLU) and after ops that only move or select values (pooling by max, flatten, reshape,
  dropout), which onnxruntime runs on the input's quantization.

Ranges start from calibration (`calibrate`: min/max or percentiles over training images) and
are then learned with the weights (LSQ/PACT-style: gradients reach the range through the scale
and through the clipping). They are parametrized in log space, `hi = exp(k * theta)`, with k =
`range_lr_scale`: Adam moves theta by about `lr` per step, so the range moves by about k * lr in
relative terms per step - the usual way to give a few parameters a larger learning rate
without a second optimizer.

The fake-quant arithmetic is written here (4 lines, public torch ops) rather than taken from
`torch.ao.quantization` (deprecated, to be removed) or torchao's PT2E flow (its x86 quantizer
failed on resnet18 here); weights use torch's own `fake_quantize_per_channel_affine`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

Mode = Literal["off", "observe", "quantize"]

# Modules/functions after which onnxruntime does NOT requantize: ReLU-likes fold into the
# producer (it is quantized after them instead); max-pooling and shape ops keep their input's
# quantization.
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCS = {F.relu, torch.relu, F.relu6}
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.Unflatten)
_PASS_FUNCS = {torch.flatten, torch.reshape, F.max_pool2d, F.dropout, operator.getitem}
_PASS_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "size"}
_INPLACE = {operator.iadd: operator.add, operator.imul: operator.mul}


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator). torch.round rounds
    half to even, as onnxruntime's QuantizeLinear does."""
    return x + (torch.round(x) - x).detach()


class ActFakeQuant(nn.Module):
    """Per-tensor uint8 fake quantization with a learned range; see the module docstring.

    Modes: `off` (identity), `observe` (identity, records the range for calibration),
    `quantize` (fake-quantizes), `probe` is `off` plus keeping the last input (for matching the
    tensor to its ONNX name).
    """

    def __init__(self, range_lr_scale: float = 10.0):
        super().__init__()
        self.k = float(range_lr_scale)
        self.mode: Mode = "off"
        self.signed = True  # False when calibration saw no negative value: lo is fixed at 0
        self.theta_hi = nn.Parameter(torch.zeros(()))
        self.theta_lo = nn.Parameter(torch.zeros(()))  # lo = -exp(k * theta_lo) when signed
        self.observed: list[tuple[float, float]] = []
        self.percentile: float | None = None
        self.last_input: torch.Tensor | None = None
        self.probe = False
        # EMA constant for `tracked` ranges (None: not tracked): in training, the range moves
        # this fraction of the way toward each batch's min/max, so it follows the activations
        # while the weights change (torch's MovingAverageMinMaxObserver uses 0.01).
        self.track: float | None = None

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        hi = torch.exp(self.k * self.theta_hi)
        lo = -torch.exp(self.k * self.theta_lo) if self.signed else hi.new_zeros(())
        return lo, hi

    def set_range(self, lo: float, hi: float) -> None:
        self.signed = lo < 0
        self._set_theta(lo, hi)
        self.theta_lo.requires_grad_(self.signed)

    def _set_theta(self, lo: float, hi: float) -> None:
        tiny = 1e-8  # a tensor that is all zeros still needs a positive scale
        with torch.no_grad():
            self.theta_hi.fill_(torch.log(torch.tensor(max(hi, tiny))) / self.k)
            self.theta_lo.fill_(torch.log(torch.tensor(max(-lo, tiny))) / self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probe:
            self.last_input = x.detach().float().clone()
        if self.mode == "off":
            return x
        if self.mode == "observe":
            v = x.detach().float()
            if self.percentile is None:
                self.observed.append((float(v.min()), float(v.max())))
            else:
                flat = v.flatten()
                if flat.numel() > 1 << 22:  # torch.quantile's input limit: a seeded subsample
                    gen = torch.Generator().manual_seed(len(self.observed))
                    flat = flat[torch.randint(flat.numel(), (1 << 22,), generator=gen)]
                q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
                lo, hi = torch.quantile(flat, q).tolist()
                self.observed.append((lo, hi))
            return x
        if self.track is not None and self.training:
            with torch.no_grad():
                v = x.detach().float()
                lo, hi = (float(t) for t in self.range())
                c = self.track
                self._set_theta(
                    lo + c * (min(float(v.min()), 0.0) - lo), hi + c * (float(v.max()) - hi)
                )
        # quantize: in float32 even under bf16/fp16 autocast (they cannot hold x / scale
        # exactly), on whatever device the model trains.
        with torch.autocast(x.device.type, enabled=False):
            lo, hi = self.range()
            scale = (hi - lo) / 255.0
            zero = torch.clamp(_round_ste(-lo / scale), 0, 255)
            q = torch.clamp(_round_ste(x.float() / scale) + zero, 0, 255)
            return ((q - zero) * scale).to(x.dtype)

    def finish_observing(self) -> None:
        """Set the range from what `observe` recorded: min/max over batches, or the mean of
        per-batch percentiles."""
        if not self.observed:
            raise RuntimeError("ActFakeQuant saw no calibration batch")
        los, his = zip(*self.observed, strict=True)
        if self.percentile is None:
            lo, hi = min(los), max(his)
        else:
            lo, hi = sum(los) / len(los), sum(his) / len(his)
        self.set_range(min(lo, 0.0), max(hi, 0.0))
        self.observed = []


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 fake quantization of a weight [out, ...]: levels in
    [-127, 127], or [-64, 64] with `reduce_range` (onnxruntime's 7-bit weights, scale =
    max|w| / 64)."""

    def __init__(self, reduce_range: bool = False):
        super().__init__()
        self.enabled = True
        self.qmax = 64 if reduce_range else 127

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        absmax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12)  # [out]
        scale = (absmax / float(self.qmax)).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.qmax, self.qmax)


# ---------------------------------------------------------------------------------------------
# Preparing a model


class QatError(ValueError):
    """The model cannot be prepared for QAT (e.g. torch.fx cannot trace it)."""


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm2d whose input is a Conv2d read by nothing else into that conv (eval
    statistics). Returns the number folded."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[str(node.target)], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(modules[str(src.target)], nn.Conv2d)
            and len(src.users) == 1
        ):
            continue
        conv, bn = modules[str(src.target)], modules[str(node.target)]
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        _set_module(gm, str(src.target), fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _set_module(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _passes_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCS
    return node.op == "call_method" and node.target in _PASS_METHODS


def prepare_qat(
    model: nn.Module,
    input_shape: tuple[int, ...],
    range_lr_scale: float = 10.0,
    reduce_range: bool = False,
) -> fx.GraphModule:
    """The fake-quantized form of `model` (a copy; see the module docstring), in mode `off`;
    `reduce_range`: 7-bit weights, as onnxruntime quantizes them with its reduce_range."""
    import copy

    from bonsai.concurrency import MODEL_CALLS, TORCH_GRAPH_LOCK

    model = copy.deepcopy(model).eval()
    for mod in model.modules():  # in-place ReLUs would overwrite the tensors fake quant reads
        if hasattr(mod, "inplace"):
            mod.inplace = False  # type: ignore[assignment]
    # Graph capture is not thread-safe beside a running export (TORCH_GRAPH_LOCK), nor beside
    # another thread's forward pass (fx patches Module.__call__ process-wide: MODEL_CALLS).
    with MODEL_CALLS.trace(), TORCH_GRAPH_LOCK:
        return _prepare(model, input_shape, range_lr_scale, reduce_range)


def _prepare(
    model: nn.Module, input_shape: tuple[int, ...], range_lr_scale: float, reduce_range: bool
) -> fx.GraphModule:
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - tracing fails in many ways on dynamic code
        raise QatError(
            f"quantize.qat needs a model torch.fx can trace; {type(model).__name__} cannot be "
            f"traced ({type(e).__name__}: {e})"
        ) from e
    for node in gm.graph.nodes:  # `out += identity` -> `out + identity`
        if node.op == "call_function" and node.target in _INPLACE:
            node.target = _INPLACE[node.target]
    gm.recompile()
    fold_batchnorm(gm)
    ShapeProp(gm).propagate(torch.zeros(2, *input_shape))
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        meta = node.meta.get("tensor_meta")
        if node.op == "output" or meta is None or not hasattr(meta, "dtype"):
            continue
        if not meta.dtype.is_floating_point or len(meta.shape) == 0:
            continue
        if node.op != "placeholder" and (
            _passes_through(node, modules)
            or (node.users and all(_is_relu(u, modules) for u in node.users))
        ):
            continue
        name = f"fq_{count}"
        count += 1
        gm.add_module(name, ActFakeQuant(range_lr_scale))
        with gm.graph.inserting_after(node):
            fq = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: u is not fq)
    for m in list(gm.modules()):
        if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Linear):
            parametrize.register_parametrization(m, "weight", WeightFakeQuant(reduce_range))
    gm.graph.lint()
    gm.recompile()
    return gm


def act_quantizers(gm: nn.Module) -> dict[str, ActFakeQuant]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, ActFakeQuant)}


def set_mode(gm: nn.Module, mode: Mode, weights: bool | None = None) -> None:
    """Switch every activation quantizer to `mode`; weight fake quant follows `weights`
    (default: on only in `quantize`)."""
    for m in act_quantizers(gm).values():
        m.mode = mode
    on = mode == "quantize" if weights is None else weights
    for w in gm.modules():
        if isinstance(w, WeightFakeQuant):
            w.enabled = on


@torch.no_grad()
def calibrate(
    gm: nn.Module, batches: Iterable[torch.Tensor], percentile: float | None = None
) -> None:
    """Initial activation ranges from calibration batches [B, C, H, W]: min/max, or the
    `percentile` (e.g. 99.99) and its mirror, averaged over batches. Weights stay fp32 here."""
    quantizers = act_quantizers(gm)
    for m in quantizers.values():
        m.percentile = percentile
    set_mode(gm, "observe", weights=False)
    gm.eval()
    for x in batches:
        gm(x)
    for m in quantizers.values():
        m.finish_observing()
    set_mode(gm, "quantize")


def strip_weight_quant(gm: nn.Module) -> None:
    """Remove the weight parametrizations, keeping the trained float weights (what the exporter
    sees and onnxruntime quantizes with the same formula)."""
    for m in list(gm.modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


@torch.no_grad()
def probe_inputs(gm: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float tensor each activation quantizer sees on batch `x`, with quantization off."""
    quantizers = act_quantizers(gm)
    set_mode(gm, "off", weights=False)
    for m in quantizers.values():
        m.probe = True
    gm.eval()
    gm(x)
    out = {}
    for n, m in quantizers.items():
        m.probe = False
        if m.last_input is not None:
            out[n] = m.last_input
            m.last_input = None
    return out


def learned_ranges(gm: nn.Module) -> dict[str, tuple[float, float]]:
    """(lo, hi) of every activation quantizer, as onnxruntime takes a calibrated range."""
    out = {}
    for n, m in act_quantizers(gm).items():
        lo, hi = m.range()
        out[n] = (float(lo.detach()), float(hi.detach()))
    return out
