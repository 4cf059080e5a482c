"""What the stages that learn share: the optimization knobs (`LearningConfig`), fine-tuning
after a structural change (`FinetuneConfig`), and saving a trained model with its manifest
(`save_trained`). train, distill, prune.*, lowrank and quantize.qat build on these, so that no
stage module imports another.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from bonsai.artifacts import Artifact, load_torch, save_torch
from bonsai.devices import describe
from bonsai.losses import cross_entropy
from bonsai.models import count_macs, count_params
from bonsai.stages.base import StageConfig, StageContext
from bonsai.training import distillation_loss, fit


class LearningConfig(StageConfig):
    """The optimization knobs of every stage that trains (train, distill, fine-tuning)."""

    # strict: an epoch count written as a float (1e9, 2.5) is refused, not silently truncated.
    epochs: int = Field(default=10, ge=1, strict=True)
    # Peak learning rate, cosine-decayed to 0; finite (lr=inf trains to NaN weights).
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=64, ge=1, strict=True)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    # In-memory: `shift` = pad by H/8 pixels (4 on 32x32) with black + random crop; `shift_flip`
    # adds a horizontal flip (the standard CIFAR augmentation).
    augment: Literal["none", "shift", "shift_flip"] = "none"
    amp: bool = False  # bf16 autocast for the forward pass (fast on CPUs with AMX/avx512_bf16)
    # NHWC model and batches: with amp, oneDNN's bf16 convolutions need no layout reorders.
    channels_last: bool = False
    # Per-step lr: cosine (optional linear warm-up, decay to 0) or onecycle (OneCycleLR).
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # may be fractional

    @model_validator(mode="after")
    def _onecycle_warms_up(self):
        if self.schedule == "onecycle" and self.warmup_epochs == 0:
            raise ValueError(
                "schedule=onecycle needs warmup_epochs > 0 (the rising part of the cycle, e.g. "
                "1); for no warm-up use schedule=cosine"
            )
        return self

    def fit(self, model, ctx: StageContext, loss_fn, gen, on_step=None) -> list[dict[str, float]]:
        """Train `model` on the context's data with these knobs; returns per-epoch history.

        A loss carrying `views` (a distillation loss that cached teacher outputs for fixed
        augmented views) has `fit` replay exactly those views. `on_step(done, total)` runs after
        every optimizer step (see `bonsai.training.fit`)."""
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
            channels_last=self.channels_last,
            schedule=self.schedule,
            warmup_epochs=self.warmup_epochs,
            views=getattr(loss_fn, "views", None),
            gen=gen,
            desc=ctx.name,
            progress=ctx.progress,
            on_step=on_step,
            device=ctx.device,
        )

    def distillation_loss(self, teacher, ctx: StageContext, gen, temperature, alpha, views):
        """The KD loss of every stage that learns from a teacher, with these knobs: the
        teacher's forwards follow `amp` and `channels_last` and run on the context's device;
        `views` > 0 caches and replays."""
        return distillation_loss(
            teacher,
            ctx.data,
            self.augment,
            temperature,
            alpha,
            teacher_views=views,
            amp=self.amp,
            channels_last=self.channels_last,
            gen=gen,
            device=ctx.device,
        )


# With augmentation: 0 runs the teacher on every batch; V > 0 computes its outputs once on V
# fixed augmented views of the training set and replays them (epoch e: view e mod V), so KD steps
# cost what plain steps cost (Fast Knowledge Distillation, Shen & Xing 2022). V = epochs: every
# epoch a new view, the teacher's work done once up front; fewer views: less up-front work, views
# repeat. Without augmentation the teacher's outputs are always cached (one view).
TeacherViews = Annotated[int, Field(ge=0, le=1000, strict=True)]


class FinetuneConfig(LearningConfig):
    """Fine-tuning after a structural change (pruning, factorization, fake quantization): with
    a `teacher` stage it distills (the loss of `distill`), without one it uses the labels."""

    epochs: int = Field(default=0, ge=0, strict=True)  # 0: no fine-tuning
    temperature: float = Field(default=4.0, gt=0, allow_inf_nan=False)  # used with a teacher
    alpha: float = Field(default=0.7, ge=0, le=1)  # weight of the KD term (1 - alpha: labels)
    teacher_views: TeacherViews = 0  # used with a teacher; see TeacherViews

    def finetune_loss(self, ctx: StageContext, gen):
        """The fine-tuning loss: distillation from the teacher stage when there is one (the loss
        of `distill`), else cross-entropy on the labels."""
        if ctx.teacher is not None:
            return self.distillation_loss(
                load_torch(ctx.teacher), ctx, gen, self.temperature, self.alpha, self.teacher_views
            )

        heads = ctx.data.heads

        def loss(logits, y, _idx, _x):
            return cross_entropy(logits, y, heads)

        return loss

    def finetune(
        self, model, ctx: StageContext, gen, on_step=None, epochs: int | None = None, loss=None
    ) -> list[dict[str, float]]:
        """Fine-tune `model` in place for `epochs` (or the given number, e.g. one pruning step's
        share); returns the per-epoch history. `on_step` as in `bonsai.training.fit`; `loss`
        (from `finetune_loss`) lets repeated calls share the teacher's cached logits."""
        epochs = self.epochs if epochs is None else epochs
        if epochs == 0:
            return []
        loss = loss or self.finetune_loss(ctx, gen)
        knobs = self if epochs == self.epochs else self.model_copy(update={"epochs": epochs})
        return knobs.fit(model, ctx, loss, gen, on_step)


def save_trained(model, spec: dict[str, Any], ctx: StageContext, history, **extra) -> Artifact:
    """Save a stage's torch output with what every training stage records: the architecture
    (`model_meta`), the data it saw, its per-epoch history, the digest of the teacher it learned
    from (when the stage has one), the device it trained on (when it trained: `trained_on`,
    e.g. `cpu` or `cuda:0 (NVIDIA H100 80GB HBM3)`; not part of the cache key), and the stage's
    own `extra` manifest sections."""
    if ctx.teacher is not None:
        extra["teacher_digest"] = ctx.teacher.digest
    if history:
        extra["trained_on"] = describe(ctx.device)
    return save_torch(
        model,
        ctx.out_dir,
        model_meta(model, spec, ctx),
        data=data_meta(ctx),
        history=history,
        **extra,
    )


def model_meta(model, spec: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """What `load_torch` needs to rebuild the model, plus its size at batch 1."""
    shape = ctx.data.input_shape
    return {
        "spec": spec,
        "in_channels": ctx.data.in_channels,
        "num_classes": ctx.data.num_outputs,  # logit columns (every head's, multi-task)
        "input_shape": list(shape),
        "params": count_params(model),
        "macs": count_macs(model, shape),
        **({"heads": ctx.data.heads.describe()} if ctx.data.heads is not None else {}),
    }


def data_meta(ctx: StageContext) -> dict[str, Any]:
    """How inputs must be prepared for the model: deployers need this beside the weights."""
    return {
        "classes": list(ctx.data.classes),
        "normalize": {"mean": list(ctx.data.mean), "std": list(ctx.data.std)},
        "raw_format": dict(ctx.data.raw_format),  # what a served model takes (bonsai.predictor)
        # Image files: how a file became a raw image (open, convert, resize filter).
        **({"decode": dict(ctx.data.decode)} if ctx.data.decode else {}),
        "data_digest": ctx.data.digest,
    }
