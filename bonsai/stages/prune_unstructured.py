"""`prune.unstructured`: magnitude pruning of individual weights to an exact target sparsity.

The smallest-magnitude weights of the conv and linear layers are set to zero, ranked over all
layers together (scope=global) or within each layer (scope=layer), through torch's own
`torch.nn.utils.prune` masks. Three modes:

- `one_shot`: prune to the target at once, then fine-tune (masked) for `epochs`.
- `gradual`: Zhu & Gupta 2017 ("To prune, or not to prune"): the sparsity rises along
  s_k = s_f + (s_i - s_f) * (1 - k / n)^3 at n mask updates spread over the first `ramp` share
  of the fine-tuning steps (s_i: the input's sparsity, s_f: the target); the rest of the
  fine-tuning runs at the target.
- `lottery`: iterative magnitude pruning with rewinding (Frankle et al. 2019, "Stabilizing the
  lottery ticket hypothesis"): train for `epochs` from the input, saving the weights after
  `rewind_steps` optimizer steps; then `rounds` times: prune the same share of the remaining
  weights, rewind the survivors to the saved weights, train `epochs` again. Costs
  (rounds + 1) x epochs of training. (Each round restarts the learning-rate schedule instead
  of resuming it at the rewind step: a simplification.)

The masks are folded into the weights at the end: the artifact holds plain tensors with exact
zeros and no mask buffers, so it loads, exports and quantizes like its input. Unstructured zeros
do not make dense kernels faster; they pay off in zipped bytes (and sparse runtimes).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import prune

from bonsai.artifacts import Artifact, load_torch
from bonsai.errors import ConfigError
from bonsai.layers import resolve_weight_layers, weight_layers
from bonsai.stages.base import ModelCheck, Stage, StageContext
from bonsai.stages.common import FinetuneConfig, save_trained
from bonsai.training import seed_everything


class PruneUnstructuredConfig(FinetuneConfig):
    sparsity: float = Field(default=0.8, gt=0, lt=1)  # share of conv/linear weights set to zero
    mode: Literal["one_shot", "gradual", "lottery"] = "one_shot"
    scope: Literal["global", "layer"] = "global"  # rank magnitudes over all layers, or per layer
    ignore: list[str] = []  # layers left dense (module names)
    # gradual: share of the fine-tuning steps over which the sparsity rises, and mask updates.
    ramp: float = Field(default=0.75, gt=0, le=1)
    updates: int = Field(default=10, ge=1, strict=True)
    # lottery: prune-rewind-retrain rounds, and the optimizer step of the first training whose
    # weights the survivors are rewound to (0: the input's weights).
    rounds: int = Field(default=3, ge=1, strict=True)
    rewind_steps: int = Field(default=20, ge=0, strict=True)

    @model_validator(mode="after")
    def _needs_training(self) -> PruneUnstructuredConfig:
        if self.mode != "one_shot" and self.epochs < 1:
            raise ValueError(
                f"mode={self.mode} prunes during training and needs epochs >= 1 (got "
                f"epochs={self.epochs}); set epochs, or use mode=one_shot"
            )
        return self


# (name, conv/linear layer). Any: torch's pruning adds weight_orig / weight_mask at run time.
Targets = list[tuple[str, Any]]


def _targets(model: nn.Module, ignore: list[str]) -> Targets:
    skip = resolve_weight_layers(model, ignore, "ignore")
    return [(n, m) for n, m in weight_layers(model).items() if n not in skip]


def _current(m: Any) -> torch.Tensor:
    """The weight as the next forward pass will see it (orig x mask when masked): torch's
    `module.weight` is only refreshed by a forward pass, and an optimizer step came after."""
    if hasattr(m, "weight_mask"):
        return (m.weight_orig * m.weight_mask).detach()
    return m.weight.detach()


def _masked(m: Any) -> int:
    return int((m.weight_mask == 0).sum()) if hasattr(m, "weight_mask") else 0


def prune_to(targets: Targets, sparsity: float, scope: str) -> None:
    """Mask the smallest-magnitude weights until exactly round(sparsity x N) of the N target
    weights (per layer with scope=layer) are masked. Masks only grow: already-masked weights
    stay masked, and the count of new ones is exact (an int amount in torch's pruning)."""
    if scope == "global":
        total = sum(m.weight.numel() for _, m in targets)
        amount = round(sparsity * total) - sum(_masked(m) for _, m in targets)
        if amount > 0:
            params = [(m, "weight") for _, m in targets]
            scores = {(m, "weight"): _current(m).abs() for _, m in targets}
            prune.global_unstructured(
                params,
                pruning_method=prune.L1Unstructured,
                importance_scores=scores,
                amount=amount,
            )
        return
    for _, m in targets:
        amount = round(sparsity * m.weight.numel()) - _masked(m)
        if amount > 0:
            prune.l1_unstructured(m, "weight", amount=amount, importance_scores=_current(m).abs())


def sparsity_of(targets: Targets) -> float:
    """Share (0-1) of the target weights that are zero, as the next forward pass sees them."""
    zeros = sum(int((_current(m) == 0).sum()) for _, m in targets)
    return zeros / max(1, sum(m.weight.numel() for _, m in targets))


def fold_masks(targets: Targets) -> None:
    """Make the masks permanent: weight = orig x mask as a plain parameter, no buffers, no hooks."""
    for _, m in targets:
        if hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def gradual_schedule(s_i: float, s_f: float, total: int, ramp: float, n: int) -> dict[int, float]:
    """Zhu & Gupta's cubic schedule: {optimizer step: sparsity} for the n mask updates spread
    over the first `ramp` share of `total` steps; the last update reaches s_f exactly."""
    ramp_end = max(1, round(ramp * total))
    out: dict[int, float] = {}
    for k in range(1, n + 1):
        step = max(1, round(k * ramp_end / n))
        out[step] = s_f + (s_i - s_f) * (1 - k / n) ** 3  # a later k at the same step wins
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, keyed as in an unmasked state dict."""
    return {
        k.removesuffix("_orig"): v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.endswith("_mask")
    }


@torch.no_grad()
def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Reset every parameter and buffer to `state`, keeping the masks: the survivors take their
    saved values, the pruned weights stay zero through their masks."""
    for k, v in model.state_dict().items():
        if not k.endswith("_mask"):
            v.copy_(state[k.removesuffix("_orig")])


class PruneUnstructured(Stage):
    kind = "prune.unstructured"
    Config = PruneUnstructuredConfig
    consumes = ("torch",)
    produces = "torch"
    teacher = "optional"

    @classmethod
    def check_models(cls, config, models: ModelCheck) -> None:
        if models.student is not None:
            resolve_weight_layers(models.student, config.ignore, "ignore")

    def run(self, ctx: StageContext) -> Artifact:
        c: PruneUnstructuredConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        gen = seed_everything(ctx.seed)
        model = load_torch(ctx.input)
        spec = ctx.input.meta["model"]["spec"]
        targets = _targets(model, c.ignore)
        s_i = sparsity_of(targets)
        loss = c.finetune_loss(ctx, gen) if c.epochs else None
        history: list[dict[str, float]] = []
        record: dict[str, Any] = {"mode": c.mode, "scope": c.scope, "input_sparsity": s_i}

        if c.mode == "one_shot":
            prune_to(targets, c.sparsity, c.scope)
            history = c.finetune(model, ctx, gen, loss=loss)
        elif c.mode == "gradual":
            done_updates: list[list[float]] = []
            plan: dict[int, float] = {}

            def update(done: int, total: int) -> None:
                if not plan:
                    plan.update(gradual_schedule(s_i, c.sparsity, total, c.ramp, c.updates))
                if done in plan:
                    prune_to(targets, plan[done], c.scope)
                    done_updates.append([done, sparsity_of(targets)])

            history = c.finetune(model, ctx, gen, on_step=update, loss=loss)
            record["schedule"] = done_updates  # [optimizer step, sparsity reached (0-1)]
        else:
            steps_per_round = c.epochs * -(-len(ctx.data.train_x) // c.batch_size)
            if c.rewind_steps >= steps_per_round:
                raise ConfigError(
                    f"rewind_steps: {c.rewind_steps} is not below the {steps_per_round} "
                    f"optimizer steps of one round (epochs={c.epochs} x "
                    f"{-(-len(ctx.data.train_x) // c.batch_size)} batches); valid: 0 <= "
                    f"rewind_steps < {steps_per_round}"
                )
            saved: dict[str, dict[str, torch.Tensor]] = {}
            if c.rewind_steps == 0:
                saved["w"] = snapshot(model)

            def keep(done: int, _total: int) -> None:
                if done == c.rewind_steps:
                    saved["w"] = snapshot(model)

            history = c.finetune(model, ctx, gen, on_step=keep, loss=loss)  # dense training
            keep_i, keep_f = 1 - s_i, 1 - c.sparsity
            rounds = []
            for r in range(1, c.rounds + 1):
                # The same share of the remaining weights goes in every round.
                prune_to(targets, 1 - keep_i * (keep_f / keep_i) ** (r / c.rounds), c.scope)
                rewind(model, saved["w"])
                history += c.finetune(model, ctx, gen, loss=loss)
                rounds.append(sparsity_of(targets))
            record["rounds"] = rounds  # sparsity (0-1) after each round
            record["rewind_steps"] = c.rewind_steps

        fold_masks(targets)
        reached = sparsity_of(targets)
        record["sparsity"] = reached
        ctx.log(
            f"{ctx.name}: {100 * reached:.2f}% of {sum(m.weight.numel() for _, m in targets):,} "
            f"conv/linear weights are zero (target {100 * c.sparsity:.2f}%, {c.mode})"
        )
        return save_trained(model, spec, ctx, history, pruning=record)
