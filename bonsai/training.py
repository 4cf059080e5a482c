"""Training loops shared by the stages that learn (train, distill, and later fine-tuning)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bonsai.concurrency import TORCH_GRAPH_LOCK
from bonsai.data import DataBundle
from bonsai.errors import TrainingDiverged


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """In-memory augmentation of a normalized batch [B, C, H, W].

    `shift`: random translation by up to H/8 pixels (zero-padded crop); `shift_flip`: plus a
    horizontal flip with probability 0.5 (not for digits: a flipped 2 is no 2).
    """
    if mode == "none":
        return x
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    # Gather per-sample crops with one advanced-indexing op: rows [B, H, 1], cols [B, 1, W].
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]
    out = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if mode == "shift_flip":
        flip = torch.rand(b, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def _autocast(enabled: bool):
    if enabled:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    model: nn.Module,
    data: DataBundle,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    augment: str = "none",
    amp: bool = False,
    gen: torch.Generator,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """Minimize `loss_fn(logits, labels, sample_index, inputs)` over the training split.

    `sample_index` [B] lets a loss look up per-sample targets (e.g. cached teacher logits);
    `inputs` is the augmented batch the model saw. `on_step(done, total)` runs after each
    optimizer step (`done` counts from 1 to `total` = epochs x steps per epoch): gradual pruning
    updates its masks there, lottery pruning saves its rewind point.
    Cosine learning-rate decay to zero over all steps. Returns per-epoch {loss, train_acc}.
    """
    x_all, y_all = data.train_x, data.train_y
    n = x_all.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    history = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{desc} epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = augment_batch(x_all[idx], augment, gen)
            y = y_all[idx]
            with _autocast(amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y, idx, x)
            if not torch.isfinite(loss.detach()):
                raise TrainingDiverged(
                    f"{desc}: the training loss became {float(loss.detach())} at epoch "
                    f"{epoch + 1}, step {step + 1} of {steps_per_epoch} (lr={lr:g}, "
                    f"optimizer={optimizer}); lower lr, or check the data for NaN values"
                )
            with TORCH_GRAPH_LOCK:  # not thread-safe while another thread exports
                opt.zero_grad(set_to_none=True)
            loss.backward()
            with TORCH_GRAPH_LOCK:
                opt.step()
                sched.step()
            if on_step is not None:
                on_step(epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch)
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            bar.set_postfix(
                loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False
            )
        bar.close()
        history.append({"loss": total_loss / seen, "train_acc": correct / seen})
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Eval-mode logits [N, K] for inputs [N, C, H, W]."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out.float()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels).

    Logits [B, K]; T softens both distributions, T^2 keeps the soft term's gradient scale.
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1 - alpha) * hard


def distillation_loss(
    teacher: nn.Module, data: DataBundle, augment: str, temperature: float, alpha: float
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `fit` loss that distills from `teacher` (frozen, eval mode).

    Without augmentation the teacher sees the same images every epoch, so its logits are
    computed once and looked up by sample index (a per-step teacher forward made KD 1.7x slower,
    STACK_NOTES); with augmentation it runs on each augmented batch.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cached = predict_logits(teacher, data.train_x) if augment == "none" else None

    def targets(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if cached is not None:
            return cached[idx]
        with torch.no_grad():
            return teacher(x).float()

    def loss(logits, y, idx, x):
        return kd_loss(logits, targets(idx, x), y, temperature, alpha)

    return loss
