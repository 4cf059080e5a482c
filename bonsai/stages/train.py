"""`train`: train a model from scratch on the training split (typically the teacher)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from bonsai.artifacts import Artifact
from bonsai.losses import cross_entropy
from bonsai.models import build_model, check_spec_value
from bonsai.stages.base import Stage, StageContext
from bonsai.stages.common import LearningConfig, save_trained
from bonsai.training import seed_everything


class TrainConfig(LearningConfig):
    model: dict[str, Any]  # architecture spec, see bonsai.models (e.g. {name: cnn, width: 64})
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)

    @field_validator("model")
    @classmethod
    def _spec(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_spec_value(v)
        return v


class Train(Stage):
    kind = "train"
    Config = TrainConfig
    consumes = (None,)
    produces = "torch"

    def run(self, ctx: StageContext) -> Artifact:
        c: TrainConfig = self.config  # type: ignore[assignment]
        gen = seed_everything(ctx.seed)
        model = build_model(c.model, ctx.data.in_channels, ctx.data.num_outputs)
        heads = ctx.data.heads
        history = c.fit(
            model,
            ctx,
            lambda logits, y, _idx, _x: cross_entropy(
                logits, y, heads, label_smoothing=c.label_smoothing
            ),
            gen,
        )
        return save_trained(model, c.model, ctx, history)
