"""`prune.structured`: remove whole channels (dependency-aware, torch-pruning), then fine-tune.

Channels are really removed: a conv with 64 outputs becomes one with 32, and every layer that
reads those channels (batch norm, the next conv, a residual add, a depthwise conv, a
squeeze-and-excitation gate) shrinks with it. torch-pruning's dependency graph finds these
coupled layers by tracing the model, so it works on architectures it was never told about. The
result has fewer parameters and MACs and runs faster in onnxruntime; it reloads through the
structure recorded in its manifest (`bonsai.models.structure_diff`).

The classifier head is never pruned at its outputs (they are the classes); its inputs shrink
with the layer before it. Fine-tuning follows (FinetuneConfig: distillation from a `teacher`
stage when one is given, cross-entropy otherwise), split between the `iterative_steps`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from bonsai.artifacts import Artifact, load_torch
from bonsai.data import DataBundle
from bonsai.errors import ConfigError, GateError
from bonsai.layers import WEIGHT_LAYERS, classifier_head, resolve_weight_layers, weight_layers
from bonsai.losses import cross_entropy
from bonsai.models import count_macs, count_params
from bonsai.stages.base import ModelCheck, Stage, StageContext
from bonsai.stages.common import FinetuneConfig, save_trained
from bonsai.training import seed_everything

TARGET_TOLERANCE = 0.05  # target_macs / target_params are reached within 5% (relative)


class PruneStructuredConfig(FinetuneConfig):
    # How channels are ranked: l1 / l2 norm of each channel's weights across its coupled layers,
    # taylor (|weight x gradient| of the training loss, on `taylor_samples` images), random (a
    # control: any other importance should beat it).
    importance: Literal["l1", "l2", "taylor", "random"] = "l2"
    # Share of channels removed: from every layer (scope=uniform) or of all channels ranked
    # together (scope=global). Exactly one of ratio, target_macs, target_params is set.
    ratio: float | None = Field(default=0.5, gt=0, lt=1)
    target_macs: int | None = Field(default=None, ge=1)  # MACs at batch 1 to reach (within 5%)
    target_params: int | None = Field(default=None, ge=1)  # parameters to reach (within 5%)
    scope: Literal["uniform", "global"] = "uniform"
    # Prune in this many equal steps; the fine-tuning epochs are split between them (after
    # each step), and Taylor importance is re-estimated before each one.
    iterative_steps: int = Field(default=1, ge=1, strict=True)
    round_to: int = Field(default=1, ge=1, strict=True)  # kept channels: a multiple of this
    # Layers whose output channels are kept (a module name covers the layers inside it); the
    # classifier head is always kept.
    ignore: list[str] = []
    taylor_samples: int = Field(default=256, ge=1, strict=True)  # images for Taylor gradients

    @model_validator(mode="after")
    def _one_target(self) -> PruneStructuredConfig:
        given = {k: getattr(self, k) for k in ("ratio", "target_macs", "target_params")}
        chosen = {k: v for k, v in given.items() if v is not None}
        if len(chosen) != 1:
            got = ", ".join(f"{k}={v}" for k, v in given.items())
            raise ValueError(
                f"set exactly one of ratio, target_macs, target_params (got {got}); e.g. "
                "ratio=null target_macs=2000000 to prune to a MACs budget"
            )
        return self


def _importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }[name]()


def _kept_layers(model: nn.Module, shape: tuple[int, ...], num_classes: int, ignore: list[str]):
    """The layers whose output channels stay: the `ignore` layers and the classifier head."""
    kept: dict[str, nn.Module] = dict(resolve_weight_layers(model, ignore, "ignore"))
    head = classifier_head(model, shape, num_classes)
    if head is not None:
        kept[head] = model.get_submodule(head)
    return kept


def _pruner(model, shape, c: PruneStructuredConfig, ratio: float, steps: int, ignored):
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        model,
        torch.zeros(1, *shape),
        importance=_importance(c.importance),
        global_pruning=c.scope == "global",
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=list(ignored.values()),
        round_to=c.round_to if c.round_to > 1 else None,
    )


def emptied_layers(
    model: nn.Module,
    shape: tuple[int, ...],
    ratio: float,
    round_to: int,
    ignored: list[nn.Module],
    dg=None,
) -> tuple[list[tuple[str, int]], float]:
    """Uniform pruning keeps int(C x (1 - ratio)) of a layer group's C channels, rounded down to
    a multiple of round_to (torch-pruning's arithmetic; torch-pruning silently skips a group it
    would empty). Returns the layers that would keep none, as (name, C), and the largest ratio
    that empties no layer. `dg`: the model's dependency graph, if already built."""
    import torch_pruning as tp

    if dg is None:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *shape))
    names = {m: n for n, m in model.named_modules()}
    empty: list[tuple[str, int]] = []
    max_ratio = 1.0
    need = max(1, round_to)
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=list(WEIGHT_LAYERS)):
        root = group[0].dep.target.module
        channels = dg.get_out_channels(root)
        if not channels:
            continue
        kept = int(channels * (1 - ratio))
        if round_to > 1 and kept < channels:
            kept -= kept % round_to
        if kept <= 0:
            empty.append((names.get(root, "?"), channels))
        max_ratio = min(max_ratio, 1 - need / channels)
    return empty, max_ratio


def taylor_gradients(model: nn.Module, data: DataBundle, n: int, gen: torch.Generator) -> None:
    """Fill `.grad` with the gradient of the mean cross-entropy over `n` training images, for
    Taylor importance (|w x dL/dw| per channel). Eval mode: batch-norm statistics stay put."""
    model.eval()
    model.zero_grad(set_to_none=True)
    idx = torch.randperm(len(data.train_x), generator=gen)[: min(n, len(data.train_x))]
    for chunk in idx.split(128):
        # Multi-task: the heads' weighted losses (mean per batch, so weighted by batch size).
        loss = cross_entropy(model(data.train_x[chunk]), data.train_y[chunk], data.heads)
        (loss * len(chunk) / len(idx)).backward()


def _copy_with_grads(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)  # deepcopy drops .grad; Taylor importance reads it
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {n: int(m.weight.shape[0]) for n, m in weight_layers(model).items()}


class PruneStructured(Stage):
    kind = "prune.structured"
    Config = PruneStructuredConfig
    consumes = ("torch",)
    produces = "torch"
    teacher = "optional"
    changes_structure = True

    @classmethod
    def check_models(cls, config, models: ModelCheck, dg=None) -> None:
        c: PruneStructuredConfig = config
        model = models.student
        if model is None:
            return
        kept = _kept_layers(model, models.input_shape, models.num_classes, c.ignore)
        if c.ratio is not None and c.scope == "uniform":
            empty, max_ratio = emptied_layers(
                model, models.input_shape, c.ratio, c.round_to, list(kept.values()), dg
            )
            if empty:
                names = ", ".join(f"{n!r} ({ch} channels)" for n, ch in empty[:5])
                fix = (
                    f"valid: 0 < ratio <= {max_ratio:.3f} for this model"
                    if max_ratio > 0
                    else "no ratio works with this round_to: lower round_to"
                )
                raise ConfigError(
                    f"ratio: {c.ratio} (round_to={c.round_to}) would remove every channel of "
                    f"{len(empty)} layer(s): {names}; {fix}, or add them to ignore"
                )
        if models.exact:
            for key, count in (
                ("target_macs", lambda: count_macs(model, models.input_shape)),
                ("target_params", lambda: count_params(model)),
            ):
                target = getattr(c, key)
                if target is not None and target >= (have := count()):
                    raise ConfigError(
                        f"{key}: {target} is not below the input model's {have}; valid: "
                        f"1 <= {key} < {have}"
                    )

    def run(self, ctx: StageContext) -> Artifact:
        c: PruneStructuredConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        gen = seed_everything(ctx.seed)
        model = load_torch(ctx.input)
        spec = ctx.input.meta["model"]["spec"]
        shape = tuple(ctx.input.meta["model"]["input_shape"])
        n_cls = ctx.data.num_outputs
        check = ModelCheck(model, None, shape, n_cls, exact=True)
        before = {"params": count_params(model), "macs": count_macs(model, shape)}
        channels_before = _out_channels(model)
        steps = c.iterative_steps
        # Fine-tuning epochs per step: the remainder goes to the last steps.
        split = [c.epochs // steps + (i >= steps - c.epochs % steps) for i in range(steps)]
        loss = c.finetune_loss(ctx, gen) if c.epochs else None
        history: list[dict[str, float]] = []
        ratios: list[float] = []

        if c.ratio is not None:
            kept = _kept_layers(model, shape, n_cls, c.ignore)
            pruner = _pruner(model, shape, c, c.ratio, steps, kept)
            # The checks made before the run, on the real input (its structure may differ from
            # the spec the pre-run check built, e.g. after another structural stage).
            self.check_models(c, check, dg=pruner.DG)
            for i in range(steps):
                if c.importance == "taylor":
                    taylor_gradients(model, ctx.data, c.taylor_samples, gen)
                pruner.step()
                model.zero_grad(set_to_none=True)
                ratios.append(c.ratio * (i + 1) / steps)
                history += c.finetune(model, ctx, gen, epochs=split[i], loss=loss)
        else:
            key = "macs" if c.target_macs is not None else "params"
            target = float(c.target_macs if key == "macs" else c.target_params)  # type: ignore[arg-type]

            def measure(m: nn.Module) -> int:
                return count_macs(m, shape) if key == "macs" else count_params(m)

            self.check_models(c, check)

            for i in range(steps):
                # Each step aims at its share of the way from the input's count to the target.
                goal = before[key] - (before[key] - target) * (i + 1) / steps
                if c.importance == "taylor":
                    taylor_gradients(model, ctx.data, c.taylor_samples, gen)
                step_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                r = self._search_ratio(model, shape, n_cls, c, goal, measure, step_seed)
                with torch.random.fork_rng(devices=[]):  # random importance: as in the search
                    torch.manual_seed(step_seed)
                    kept = _kept_layers(model, shape, n_cls, c.ignore)
                    _pruner(model, shape, c, r, 1, kept).step()
                model.zero_grad(set_to_none=True)
                ratios.append(r)
                reached = measure(model)
                if abs(reached - goal) > TARGET_TOLERANCE * goal:  # before spending fine-tuning
                    raise GateError(
                        f"target_{key}={int(target)} not reached within 5%: the closest pruning "
                        f"gives {reached} for a goal of {int(goal)} at step {i + 1} of {steps} "
                        f"(from {before[key]}); channel counts move in steps (round_to="
                        f"{c.round_to}, scope={c.scope}): lower round_to or use scope=global"
                    )
                history += c.finetune(model, ctx, gen, epochs=split[i], loss=loss)

        after = {"params": count_params(model), "macs": count_macs(model, shape)}
        channels_after = _out_channels(model)
        ctx.log(
            f"{ctx.name}: pruned params {before['params']:,} -> {after['params']:,} "
            f"(-{100 * (1 - after['params'] / before['params']):.1f}%), MACs "
            f"{before['macs']:,} -> {after['macs']:,} "
            f"(-{100 * (1 - after['macs'] / before['macs']):.1f}%)"
        )
        pruning: dict[str, Any] = {
            "before": before,
            "after": after,
            "step_ratios": ratios,
            # Output channels per conv/linear layer: [before, after].
            "channels": {
                n: [channels_before[n], channels_after.get(n, channels_before[n])]
                for n in channels_before
            },
        }
        return save_trained(model, spec, ctx, history, pruning=pruning)

    @staticmethod
    def _search_ratio(
        model: nn.Module,
        shape: tuple[int, ...],
        n_cls: int,
        c: PruneStructuredConfig,
        goal: float,
        measure: Callable[[nn.Module], int],
        seed: int,
    ) -> float:
        """Bisect the pruning ratio (on copies of the model) whose result is closest to `goal`.
        MACs and params fall (stepwise) as the ratio grows."""
        best_r, best_err = 0.0, float("inf")
        lo, hi = 0.0, 0.99
        for _ in range(16):
            r = (lo + hi) / 2
            twin = _copy_with_grads(model)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                kept = _kept_layers(twin, shape, n_cls, c.ignore)
                _pruner(twin, shape, c, r, 1, kept).step()
            got = measure(twin)
            if abs(got - goal) < best_err:
                best_r, best_err = r, abs(got - goal)
            if abs(got - goal) <= 0.005 * goal:
                break
            if got > goal:
                lo = r
            else:
                hi = r
        return best_r
