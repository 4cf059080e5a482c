"""`train`: train a model from scratch on the training split (typically the teacher)."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from pydantic import Field, field_validator

from bonsai.artifacts import Artifact, save_torch
from bonsai.models import build_model, check_spec_value, count_macs, count_params
from bonsai.stages.base import Stage, StageConfig, StageContext
from bonsai.training import fit, seed_everything


class LearningConfig(StageConfig):
    """The optimization knobs of every stage that trains (train, distill)."""

    epochs: int = Field(default=10, ge=1)
    lr: float = Field(default=1e-3, gt=0)  # peak learning rate, cosine-decayed to 0
    batch_size: int = Field(default=64, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    augment: Literal["none", "shift", "shift_flip"] = "none"
    amp: bool = False  # bf16 autocast for the forward pass (fast on CPUs with AMX/avx512_bf16)

    def fit(self, model, ctx: StageContext, loss_fn, gen) -> list[dict[str, float]]:
        """Train `model` on the context's data with these knobs; returns per-epoch history."""
        return fit(
            model,
            ctx.data,
            loss_fn=loss_fn,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
            augment=self.augment,
            amp=self.amp,
            gen=gen,
            desc=ctx.name,
            progress=ctx.progress,
        )


class TrainConfig(LearningConfig):
    model: dict[str, Any]  # architecture spec, see bonsai.models (e.g. {name: cnn, width: 64})
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)

    @field_validator("model")
    @classmethod
    def _spec(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_spec_value(v)
        return v


def model_meta(model, spec: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """What `load_torch` needs to rebuild the model, plus its size at batch 1."""
    shape = ctx.data.input_shape
    return {
        "spec": spec,
        "in_channels": ctx.data.in_channels,
        "num_classes": ctx.data.num_classes,
        "input_shape": list(shape),
        "params": count_params(model),
        "macs": count_macs(model, shape),
    }


def data_meta(ctx: StageContext) -> dict[str, Any]:
    """How inputs must be prepared for the model: deployers need this beside the weights."""
    return {
        "classes": list(ctx.data.classes),
        "normalize": {"mean": list(ctx.data.mean), "std": list(ctx.data.std)},
        "data_digest": ctx.data.digest,
    }


class Train(Stage):
    kind = "train"
    Config = TrainConfig
    consumes = (None,)
    produces = "torch"

    def run(self, ctx: StageContext) -> Artifact:
        c: TrainConfig = self.config  # type: ignore[assignment]
        gen = seed_everything(ctx.seed)
        model = build_model(c.model, ctx.data.in_channels, ctx.data.num_classes)
        history = c.fit(
            model,
            ctx,
            lambda logits, y, _idx, _x: F.cross_entropy(
                logits, y, label_smoothing=c.label_smoothing
            ),
            gen,
        )
        return save_torch(
            model,
            ctx.out_dir,
            model_meta(model, c.model, ctx),
            data=data_meta(ctx),
            history=history,
        )
