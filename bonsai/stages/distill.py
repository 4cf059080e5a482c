"""`distill`: Hinton knowledge distillation of a student from a teacher artifact.

loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones
(Hinton et al., 2015). The student is built from `model`, or starts from the input artifact's
weights when the stage has an `input` (e.g. fine-tuning a pruned model with KD).

With augmentation the teacher would run on every batch; `teacher_views: V` instead computes its
outputs once on V fixed augmented views and replays them (Fast Knowledge Distillation, Shen & Xing
2022), so a KD step costs what a plain step costs (bench/kd_budget.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from bonsai.artifacts import Artifact, load_torch, save_torch
from bonsai.errors import ConfigError
from bonsai.models import build_model, check_spec_value
from bonsai.stages.base import Stage, StageContext
from bonsai.stages.train import LearningConfig, TeacherViews, data_meta, model_meta
from bonsai.training import seed_everything


class DistillConfig(LearningConfig):
    model: dict[str, Any] | None = None  # student architecture; omit when the stage has an input
    temperature: float = Field(default=4.0, gt=0, allow_inf_nan=False)  # softens both
    alpha: float = Field(default=0.7, ge=0, le=1)  # weight of the KD term (1 - alpha: labels)
    teacher_views: TeacherViews = 0  # cached, replayed teacher outputs; see TeacherViews

    @field_validator("model")
    @classmethod
    def _spec(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_spec_value(v)
        return v


class Distill(Stage):
    kind = "distill"
    Config = DistillConfig
    consumes = (None, "torch")
    produces = "torch"
    teacher = "required"

    @classmethod
    def check_inputs(cls, config, input_kind, has_teacher) -> None:
        if input_kind is None and config.model is None:
            raise ConfigError(
                "distill needs a student: set `model` (an architecture spec) or `input` "
                "(a stage whose torch model to start from)"
            )
        if input_kind is not None and config.model is not None:
            raise ConfigError(
                "distill got both `model` and `input`; set one: `model` builds a new student, "
                "`input` fine-tunes an existing one"
            )

    def run(self, ctx: StageContext) -> Artifact:
        c: DistillConfig = self.config  # type: ignore[assignment]
        assert ctx.teacher is not None, "validated by the pipeline"
        gen = seed_everything(ctx.seed)
        teacher = load_torch(ctx.teacher)
        if ctx.input is not None:
            student = load_torch(ctx.input).train()
            spec = ctx.input.meta["model"]["spec"]
        else:
            assert c.model is not None, "validated by check_inputs"
            spec = c.model
            student = build_model(spec, ctx.data.in_channels, ctx.data.num_classes)
        loss = c.distillation_loss(teacher, ctx, gen, c.temperature, c.alpha, c.teacher_views)
        history = c.fit(student, ctx, loss, gen)
        return save_torch(
            student,
            ctx.out_dir,
            model_meta(student, spec, ctx),
            data=data_meta(ctx),
            history=history,
            teacher_digest=ctx.teacher.digest,
        )
