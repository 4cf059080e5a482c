"""`distill`: Hinton knowledge distillation of a student from a teacher artifact, optionally
with FitNets feature hints.

loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
       + sum_i weight_i * MSE(resize(adapter_i(student feature_i)), teacher feature_i)

The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones
(Hinton et al., 2015). Feature hints (Romero et al., 2015, "FitNets") make named student layers
imitate named teacher layers: each student feature passes through a learned adapter (a 1x1 conv
for [B, C, H, W] maps, a linear layer for [B, C] vectors) to the teacher's channel count, and is
resized to the teacher's H x W (average-pooled down, bilinear up) when they differ. The adapters
train with the student and are dropped afterwards. Hints and the KD term train jointly (not in
FitNets' two stages), and with hints the teacher runs on every batch (its logits are not cached).

With augmentation the teacher would run on every batch; `teacher_views: V` instead computes its
outputs once on V fixed augmented views and replays them (Fast Knowledge Distillation, Shen & Xing
2022), so a KD step costs what a plain step costs (bench/kd_budget.py).

The student is built from `model`, or starts from the input artifact's weights when the stage
has an `input` (e.g. fine-tuning a pruned model with KD).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from bonsai.artifacts import Artifact, load_torch
from bonsai.errors import ConfigError
from bonsai.layers import unknown_names_message
from bonsai.losses import kd_loss
from bonsai.models import build_model, check_spec_value
from bonsai.stages.base import ModelCheck, Stage, StageConfig, StageContext
from bonsai.stages.common import LearningConfig, TeacherViews, save_trained
from bonsai.training import seed_everything


class FeatureHint(StageConfig):
    student: str  # module name in the student whose output imitates...
    teacher: str  # ...this module's output in the teacher
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # of this hint's MSE term


class DistillConfig(LearningConfig):
    model: dict[str, Any] | None = None  # student architecture; omit when the stage has an input
    temperature: float = Field(default=4.0, gt=0, allow_inf_nan=False)  # softens both
    alpha: float = Field(default=0.7, ge=0, le=1)  # weight of the KD term (1 - alpha: labels)
    teacher_views: TeacherViews = 0  # cached, replayed teacher outputs; see TeacherViews
    features: list[FeatureHint] = []  # FitNets hints: [{student: layer, teacher: layer, weight}]

    @field_validator("model")
    @classmethod
    def _spec(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_spec_value(v)
        return v

    @model_validator(mode="after")
    def _views_or_hints(self):
        if self.features and self.teacher_views:
            raise ValueError(
                "teacher_views replays cached teacher logits, but feature hints need the "
                "teacher's features on every batch: set teacher_views=0, or drop features"
            )
        return self


def feature_shapes(
    model: nn.Module, names: list[str], input_shape: tuple[int, ...], key: str
) -> list[tuple[int, ...]]:
    """Output shapes of the named modules for a batch of 2 zero images. Raises ConfigError
    (with `key`) for unknown names, listing the valid ones, or outputs that are no
    [B, C] / [B, C, H, W] tensor."""
    modules = dict(model.named_modules())
    valid = [n for n in modules if n]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(unknown_names_message(key, unknown, valid))
    out: dict[str, Any] = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, o, n=n: out.setdefault(n, o))
        for n in set(names)
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    shapes = []
    for n in names:
        o = out.get(n)
        if not isinstance(o, torch.Tensor) or o.ndim not in (2, 4):
            got = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            raise ConfigError(
                f"{key}: layer {n!r} outputs {got}; a feature hint needs a [B, C, H, W] map or "
                "a [B, C] vector (pick a conv/block or a pooled layer)"
            )
        shapes.append(tuple(o.shape))
    return shapes


def check_hints(
    hints: list[FeatureHint],
    student: nn.Module | None,
    teacher: nn.Module | None,
    input_shape: tuple[int, ...],
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Validate every hint against the models; returns (student shape, teacher shape) pairs."""
    s_shapes = t_shapes = None
    if student is not None:
        s_shapes = [
            feature_shapes(student, [h.student], input_shape, f"features.{i}.student")[0]
            for i, h in enumerate(hints)
        ]
    if teacher is not None:
        t_shapes = [
            feature_shapes(teacher, [h.teacher], input_shape, f"features.{i}.teacher")[0]
            for i, h in enumerate(hints)
        ]
    if s_shapes is None or t_shapes is None:
        return []
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes, strict=True)):
        if len(s) != len(t):
            raise ConfigError(
                f"features.{i}: student layer {hints[i].student!r} outputs {list(s)} but teacher "
                f"layer {hints[i].teacher!r} outputs {list(t)}; pair maps with maps ([B, C, H, W]) "
                "or vectors with vectors ([B, C])"
            )
    return list(zip(s_shapes, t_shapes, strict=True))


class HintedStudent(nn.Module):
    """The student plus one learned adapter per hint. `forward` returns the student's logits and
    keeps the hinted student features (in `feats`) for the loss."""

    def __init__(self, student: nn.Module, hints: list[FeatureHint], shapes):
        super().__init__()
        self.student = student
        adapters: list[nn.Module] = []
        for (s, t), _ in zip(shapes, hints, strict=True):
            # 1x1 conv [B, Cs, H, W] -> [B, Ct, H, W], or linear [B, Cs] -> [B, Ct].
            adapters.append(nn.Conv2d(s[1], t[1], 1) if len(s) == 4 else nn.Linear(s[1], t[1]))
        self.adapters = nn.ModuleList(adapters)
        self.feats: dict[int, torch.Tensor] = {}
        self._handles = [
            student.get_submodule(h.student).register_forward_hook(
                lambda _m, _i, o, i=i: self.feats.__setitem__(i, o)
            )
            for i, h in enumerate(hints)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.feats.clear()
        return self.student(x)

    def detach_hooks(self) -> nn.Module:
        for h in self._handles:
            h.remove()
        return self.student


def _match(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Resize an adapted student map [B, C, Hs, Ws] to the teacher's [Ht, Wt]."""
    if s.ndim != 4 or s.shape[-2:] == t.shape[-2:]:
        return s
    size = (int(t.shape[-2]), int(t.shape[-1]))
    if s.shape[-2] >= size[0] and s.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(s, size)
    return F.interpolate(s, size=size, mode="bilinear", align_corners=False)


def hint_loss(wrapper: HintedStudent, teacher: nn.Module, c: DistillConfig, heads=None):
    """A `fit` loss: KD on the logits plus the weighted hint MSEs, teacher run on each batch."""
    t_feats: dict[int, torch.Tensor] = {}
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for i, h in enumerate(c.features):
        teacher.get_submodule(h.teacher).register_forward_hook(
            lambda _m, _i, o, i=i: t_feats.__setitem__(i, o)
        )

    def loss(logits, y, _idx, x):
        with torch.no_grad():
            t_logits = teacher(x).float()
        total = kd_loss(logits, t_logits, y, c.temperature, c.alpha, heads)
        for i, h in enumerate(c.features):
            s = wrapper.adapters[i](wrapper.feats[i].float())
            t = t_feats[i].float()
            total = total + h.weight * F.mse_loss(_match(s, t), t)
        return total

    return loss


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

    @classmethod
    def check_models(cls, config, models: ModelCheck) -> None:
        if config.features:
            check_hints(config.features, models.student, models.teacher, models.input_shape)

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
            student = build_model(spec, ctx.data.in_channels, ctx.data.num_outputs)
        if c.features:
            shapes = check_hints(c.features, student, teacher, ctx.data.input_shape)
            wrapper = HintedStudent(student, c.features, shapes)
            teacher.to(ctx.device)  # runs on every batch, beside the student (`fit` moves it)
            history = c.fit(wrapper, ctx, hint_loss(wrapper, teacher, c, ctx.data.heads), gen)
            student = wrapper.detach_hooks()
        else:
            loss = c.distillation_loss(teacher, ctx, gen, c.temperature, c.alpha, c.teacher_views)
            history = c.fit(student, ctx, loss, gen)
        return save_trained(student, spec, ctx, history)
