"""`lowrank`: truncated-SVD factorization of linear and convolution layers.

A weight matrix W [out, in] is replaced by its best rank-r approximation U_r S_r V_r^T, as two
layers: in -> r (weights sqrt(S_r) V_r^T, no bias) and r -> out (weights U_r sqrt(S_r), the
original bias). A k x k convolution is factorized the same way on W reshaped to
[out, in * k * k]: a k x k convolution with r outputs (the original stride, padding and
dilation), then a 1x1 convolution with `out` outputs. Both become an `nn.Sequential` of the two,
recorded in the artifact's structure so that it reloads without pickle.

The rank r of each layer: ceil(rank_ratio x full rank), or the fewest singular values keeping
`energy` of sum(S^2) (the squared Frobenius norm). Layers where r (in*k*k + out) would not be
below out * in*k*k parameters are left as they are and named in the log, as are grouped
(depthwise) convolutions, which have no matrix to factorize. Optional fine-tuning follows
(FinetuneConfig: with a `teacher` stage it distills).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from bonsai.artifacts import Artifact, load_torch
from bonsai.layers import resolve_weight_layers, weight_layers
from bonsai.models import count_macs, count_params
from bonsai.stages.base import ModelCheck, Stage, StageContext
from bonsai.stages.common import FinetuneConfig, save_trained
from bonsai.training import seed_everything


class LowRankConfig(FinetuneConfig):
    # Exactly one: the share of each layer's full rank kept, or the share of its spectral
    # energy (sum of squared singular values) kept.
    rank_ratio: float | None = Field(default=None, gt=0, le=1)
    energy: float | None = Field(default=0.9, gt=0, le=1)
    ignore: list[str] = []  # layers left as they are (module names)

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankConfig:
        if (self.rank_ratio is None) == (self.energy is None):
            raise ValueError(
                f"set exactly one of rank_ratio and energy (got rank_ratio={self.rank_ratio}, "
                f"energy={self.energy}); e.g. energy=null rank_ratio=0.25"
            )
        return self


def choose_rank(s: torch.Tensor, rank_ratio: float | None, energy: float | None) -> int:
    """The kept rank (>= 1) for singular values `s` (descending)."""
    if rank_ratio is not None:
        return max(1, math.ceil(rank_ratio * len(s)))
    assert energy is not None
    share = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    # The first index whose cumulative share reaches `energy` (a tiny slack for rounding).
    return int((share < energy - 1e-12).sum()) + 1


def factorize(layer: nn.Conv2d | nn.Linear, rank_ratio: float | None, energy: float | None):
    """(the two-layer replacement, rank, full rank) or (None, reason) when not worth it."""
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return None, f"grouped conv (groups={layer.groups})"
        out, cin, kh, kw = w.shape
        mat = w.reshape(out, cin * kh * kw)  # [out, in*k*k]
    else:
        out, cin = w.shape
        mat = w
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)  # u [out, q], s [q], vh [q, in*k*k]
    r = choose_rank(s, rank_ratio, energy)
    dense = mat.shape[0] * mat.shape[1]
    if r * (mat.shape[0] + mat.shape[1]) >= dense:
        return None, f"rank {r} of {len(s)} would not save parameters"
    root = s[:r].sqrt()
    first_w = root[:, None] * vh[:r]  # [r, in*k*k]
    second_w = u[:, :r] * root[None, :]  # [out, r]
    bias = layer.bias
    if isinstance(layer, nn.Conv2d):
        pad = layer.padding
        first: nn.Conv2d | nn.Linear = nn.Conv2d(
            cin,
            r,
            (kh, kw),
            stride=(layer.stride[0], layer.stride[1]),
            padding=pad if isinstance(pad, str) else (pad[0], pad[1]),
            dilation=(layer.dilation[0], layer.dilation[1]),
            bias=False,
            padding_mode=layer.padding_mode,
        )
        second: nn.Conv2d | nn.Linear = nn.Conv2d(r, out, 1, bias=bias is not None)
        first_w = first_w.reshape(r, cin, kh, kw)
        second_w = second_w.reshape(out, r, 1, 1)
    else:
        first = nn.Linear(cin, r, bias=False)
        second = nn.Linear(r, out, bias=bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_w.to(layer.weight.dtype))
        second.weight.copy_(second_w.to(layer.weight.dtype))
        if bias is not None and second.bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second), (r, len(s))


class LowRank(Stage):
    kind = "lowrank"
    Config = LowRankConfig
    consumes = ("torch",)
    produces = "torch"
    teacher = "optional"
    changes_structure = True

    @classmethod
    def check_models(cls, config, models: ModelCheck) -> None:
        if models.student is not None:
            resolve_weight_layers(models.student, config.ignore, "ignore")

    def run(self, ctx: StageContext) -> Artifact:
        c: LowRankConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        gen = seed_everything(ctx.seed)
        model = load_torch(ctx.input)
        spec = ctx.input.meta["model"]["spec"]
        shape = tuple(ctx.input.meta["model"]["input_shape"])
        skip = resolve_weight_layers(model, c.ignore, "ignore")
        before = {"params": count_params(model), "macs": count_macs(model, shape)}
        ranks: dict[str, list[int]] = {}
        skipped: dict[str, str] = {}
        for name, layer in weight_layers(model).items():
            if name in skip:
                skipped[name] = "in ignore"
                continue
            if not isinstance(layer, nn.Conv2d | nn.Linear):
                skipped[name] = f"{type(layer).__name__} is not factorized"
                continue
            new, info = factorize(layer, c.rank_ratio, c.energy)
            if new is None:
                skipped[name] = str(info)
                continue
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            ranks[name] = list(info)
        for name, why in skipped.items():
            ctx.log(f"{ctx.name}: kept {name} as it is: {why}")
        history = c.finetune(model, ctx, gen)
        after = {"params": count_params(model), "macs": count_macs(model, shape)}
        ctx.log(
            f"{ctx.name}: factorized {len(ranks)} layer(s); params {before['params']:,} -> "
            f"{after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,}"
        )
        record: dict[str, Any] = {
            "before": before,
            "after": after,
            "ranks": ranks,  # layer -> [kept rank, full rank]
            "skipped": skipped,  # layer -> why it was left as it is
        }
        return save_trained(model, spec, ctx, history, lowrank=record)
