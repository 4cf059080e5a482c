"""Training loops shared by the stages that learn (train, distill, and later fine-tuning).

Speed on CPU (measured on the 2-core reference machine, bench/train_speed.py): what a hand-written
loop gets right and a generic one easily misses is the memory format. With bf16 autocast, oneDNN
runs convolutions on AMX in NHWC ("channels_last"); a model and inputs left in NCHW pay a layout
reorder around every convolution. `channels_last=True` converts the model and every batch once.

Devices (`bonsai.devices`): `fit(device=...)` moves the model, the training split and the loss's
teacher there for the run and the model back where it was afterwards; augmentation runs where
the images are. The data order and the augmentation parameters are drawn from a CPU generator on
every device, so a CPU run is bit-identical to what it was before devices existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bonsai.concurrency import MODEL_CALLS, TORCH_GRAPH_LOCK
from bonsai.data import DataBundle
from bonsai.devices import autocast, device_of, grad_scaler
from bonsai.devices import prepare as prepare_device
from bonsai.errors import TrainingDiverged
from bonsai.heads import Heads, labels, predictions
from bonsai.losses import kd_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Augmentation on in-memory tensors
#
# An augmentation is drawn as integer parameters per sample, `[B, 3]` int16 (dy, dx, flip), and
# then applied; drawing and applying are separate so that a fixed set of views can be stored and
# replayed (distillation with cached teacher outputs, below).


def augment_pad(h: int) -> int:
    """Pixels of padding (and largest shift) for images of height `h`: 4 for 32x32 (the standard
    CIFAR pad-4 + random 32x32 crop), 1 for 8x8 digits."""
    return max(1, h // 8)


def draw_augment(n: int, h: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random augmentation parameters `[n, 3]` int16: crop offsets (dy, dx) in [0, 2*pad] into
    the padded image, and flip (0/1). `none` draws nothing and returns the identity (pad, pad, 0)."""
    pad = augment_pad(h)
    out = torch.zeros(n, 3, dtype=torch.int16)
    if mode == "none":
        out[:, :2] = pad
        return out
    # torchvision's RandomCrop(padding=4) picks the top-left corner uniformly in [0, 2*pad].
    out[:, 0] = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out[:, 1] = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    if mode == "shift_flip":
        out[:, 2] = (torch.rand(n, generator=gen) < 0.5).to(torch.int16)
    return out


def apply_augment(x: torch.Tensor, params: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Crop-after-pad and flip a normalized batch `x` [B, C, H, W] by `params` [B, 3].

    The padding takes `fill` [C], the normalized value of a black pixel (-mean/std): the result
    equals padding the raw image with zeros, cropping, flipping and then normalizing, i.e.
    torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip on raw images.
    Returns [B, C, H, W] laid out channels-last in memory (what `channels_last` training feeds
    the model without another copy); `.contiguous()` gives NCHW. Runs on `x`'s device.
    """
    b, c, h, w = x.shape
    dev = x.device
    pad = augment_pad(h)
    hp, wp = h + 2 * pad, w + 2 * pad
    # NHWC: one pixel's channels adjacent
    padded = torch.empty(b, hp, wp, c, dtype=x.dtype, device=dev)
    padded[:] = fill.to(dev, x.dtype)
    padded[:, pad : pad + h, pad : pad + w] = x.permute(0, 2, 3, 1)
    dy, dx, flip = (params[:, i].to(dev).long() for i in range(3))
    ar = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None] > 0, ar.flip(0)[None, :], ar[None, :]) + dx[:, None]  # [B, W]
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]  # [B, H]
    # Every output pixel's row in `padded` viewed as [B*hp*wp, C]: one gather for the batch.
    batch = torch.arange(b, device=dev)[:, None, None]
    pixel = (batch * hp + rows[:, :, None]) * wp + cols[:, None, :]
    out = padded.view(-1, c).index_select(0, pixel.view(-1)).view(b, h, w, c)
    return out.permute(0, 3, 1, 2)


def black_fill(data: DataBundle) -> torch.Tensor:
    """[C]: the normalized value of a raw 0 pixel, what padding must take (see apply_augment)."""
    mean = torch.tensor(data.mean, dtype=torch.float32)
    std = torch.tensor(data.std, dtype=torch.float32)
    return -mean / std


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator, fill=None) -> torch.Tensor:
    """In-memory augmentation of a normalized batch [B, C, H, W].

    `shift`: random translation by up to H/8 pixels (a crop of the padded image); `shift_flip`:
    plus a horizontal flip with probability 0.5 (not for digits: a flipped 2 is no 2). `fill`
    [C] is the padding value (default 0, the mean pixel; `black_fill(data)` is exact).
    """
    if mode == "none":
        return x
    b, c, h, _ = x.shape
    fill = torch.zeros(c, device=x.device) if fill is None else fill
    return apply_augment(x, draw_augment(b, h, mode, gen), fill).contiguous()


# ---------------------------------------------------------------------------------------------
# The loop


def _memory_format(channels_last: bool, x: torch.Tensor) -> torch.Tensor:
    """The batch in the layout the model runs in (a no-op when it already is)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def make_optimizer(params, optimizer: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def make_schedule(
    opt: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule peaking at the optimizer's lr.

    `cosine`: linear warm-up from lr/25 over `warmup_steps` (none when 0), then cosine decay to 0.
    `onecycle`: torch's OneCycleLR (Smith & Topin 2017): cosine warm-up from lr/25 to lr over
    `warmup_steps`, then cosine annealing to lr/25/1e4. Momentum is left as the optimizer sets it
    (cycle_momentum=False), so `optimizer=sgd` means momentum 0.9 under every schedule.
    Warm-up is capped at half the run (a `debug=fast` run of 1 epoch still decays).
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(warmup_steps, total_steps // 2)
    lrs = torch.optim.lr_scheduler
    # OneCycleLR divides by each phase's length in steps minus one: both need >= 2 steps. A run
    # shorter than 4 steps (a smoke test) gets the cosine schedule instead.
    if schedule == "onecycle" and total_steps >= 4:
        warmup_steps = min(max(warmup_steps, 2), total_steps - 2)
        return lrs.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total_steps,
            pct_start=warmup_steps / total_steps,
            anneal_strategy="cos",
            cycle_momentum=False,
            div_factor=25.0,
            final_div_factor=1e4,
        )
    if warmup_steps == 0:
        return lrs.CosineAnnealingLR(opt, T_max=total_steps)
    return lrs.SequentialLR(
        opt,
        [
            lrs.LinearLR(opt, start_factor=1 / 25, total_iters=warmup_steps),
            lrs.CosineAnnealingLR(opt, T_max=total_steps - warmup_steps),
        ],
        milestones=[warmup_steps],
    )


def fit(
    model: nn.Module,
    data: DataBundle,
    *,
    loss_fn: LossFn,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    augment: str = "none",
    amp: bool = False,
    channels_last: bool = False,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    views: torch.Tensor | None = None,
    gen: torch.Generator,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
) -> list[dict[str, float]]:
    """Minimize `loss_fn(logits, labels, sample_index, inputs)` over the training split.

    `sample_index` [B] lets a loss look up per-sample targets (e.g. cached teacher logits);
    `inputs` is the augmented batch the model saw. `views` [V, N, 3] fixes the augmentation of
    every sample in each epoch (epoch e uses view e mod V) instead of drawing it fresh: a loss
    that cached teacher outputs for those views replays them (see `DistillationLoss`); a loss
    with a `set_epoch(epoch)` method is called at the start of every epoch. `on_step(done,
    total)` runs after each optimizer step (`done` counts from 1 to `total` = epochs x steps per
    epoch): gradual pruning updates its masks there, lottery pruning saves its rewind point.
    Returns per-epoch {loss, train_acc (percent)}. The model is back in NCHW memory format and
    eval mode when this returns.

    `device`: where the steps run (`bonsai.devices`). The model and the training split move
    there once per call (the split is small: CIFAR-10's is 600 MB in float32), the model moves
    back to the device it came from at the end; the loss's own tensors (a teacher, cached
    logits) must already be there (`distillation_loss(device=...)`). `amp` autocasts to the
    device's dtype (bf16 on CPUs and recent GPUs, fp16 with gradient scaling on older GPUs).
    Sample indices reach `loss_fn` on the device.
    """
    dev = prepare_device(device)
    home = device_of(model)
    x_all, y_all = data.train_x.to(dev), data.train_y.to(dev)  # no copy on the CPU
    n, h = x_all.shape[0], x_all.shape[2]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    fill = black_fill(data).to(dev)
    model.to(dev)  # before the optimizer takes the parameters
    if channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights to NHWC, in place
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr, weight_decay)
    sched = make_schedule(
        opt, schedule, epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    )
    scaler = grad_scaler(dev, amp)  # float16 autocast only
    # A loss replaying cached views is told which epoch (view) each step belongs to.
    set_epoch = getattr(loss_fn, "set_epoch", None)
    history = []
    model.train()
    try:
        for epoch in range(epochs):
            if set_epoch is not None:
                set_epoch(epoch)
            perm = torch.randperm(n, generator=gen)
            total_loss, correct, seen = 0.0, 0.0, 0
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"{desc} epoch {epoch + 1}/{epochs}",
                disable=not progress,
                leave=True,
                dynamic_ncols=True,
                mininterval=0.5,
            )
            for step in bar:
                idx = perm[step * batch_size : (step + 1) * batch_size]  # on the CPU
                idx_dev = idx.to(dev, non_blocking=True)
                x = x_all[idx_dev]
                if views is not None:
                    x = apply_augment(x, views[epoch % len(views)][idx], fill)
                elif augment != "none":
                    x = apply_augment(x, draw_augment(len(idx), h, augment, gen), fill)
                x = _memory_format(channels_last, x)
                y = y_all[idx_dev]
                with MODEL_CALLS.forward():  # the teacher's forward in loss_fn too
                    with autocast(dev, amp):
                        logits = model(x)
                    loss = loss_fn(logits.float(), y, idx_dev, x)
                hit = predictions(logits.detach(), data.heads) == labels(y, data.heads)
                # One read of the device per step (the loss and the batch's accuracy together);
                # multi-task: the accuracy is the mean over heads.
                step_loss, step_acc = torch.stack([loss.detach(), hit.float().mean()]).tolist()
                if not math.isfinite(step_loss):
                    raise TrainingDiverged(
                        f"{desc}: the training loss became {step_loss} at epoch "
                        f"{epoch + 1}, step {step + 1} of {steps_per_epoch} (lr={lr:g}, "
                        f"optimizer={optimizer}); lower lr, or check the data for NaN values"
                    )
                with TORCH_GRAPH_LOCK:  # not thread-safe while another thread exports
                    opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    with TORCH_GRAPH_LOCK:
                        opt.step()
                        sched.step()
                else:  # float16: scaled loss; a step whose gradients overflowed is skipped
                    scaler.scale(loss).backward()
                    with TORCH_GRAPH_LOCK:
                        scaler.step(opt)
                        scaler.update()
                        sched.step()
                if on_step is not None:
                    on_step(epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch)
                total_loss += step_loss * len(idx)
                correct += step_acc * len(idx)
                seen += len(idx)
                bar.set_postfix(
                    loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False
                )
            bar.close()
            history.append({"loss": total_loss / seen, "train_acc": 100.0 * correct / seen})
    finally:
        if channels_last:  # evaluation, export and saving expect the default layout
            model.to(memory_format=torch.contiguous_format)
        model.to(home)  # evaluation, export and saving run on the CPU
    model.eval()
    return history


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 512,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """Eval-mode logits [N, K] (float32) for inputs [N, C, H, W], on `x`'s device.

    `amp`/`channels_last` run the forward in bf16 on NHWC (a teacher's targets for KD: ~3x
    cheaper on AMX CPUs); leave them off where fp32 results matter (evaluation, export parity).
    The forward runs where the model is: batches are moved there, the logits back to `x`'s
    device.
    """
    dev = device_of(model)
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        with autocast(dev, amp):
            batches = []
            for i in range(0, len(x), batch_size):
                xb = _memory_format(channels_last, x[i : i + batch_size].to(dev))
                with MODEL_CALLS.forward():
                    batches.append(model(xb).float().to(x.device))
            out = torch.cat(batches)
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    model.train(was_training)
    return out.float()


# ---------------------------------------------------------------------------------------------
# Knowledge distillation


@dataclass
class DistillationLoss:
    """A `fit` loss that distills from a frozen teacher.

    Where the teacher's targets come from:
    - no augmentation: the teacher sees the same images every epoch, so its logits [N, K] are
      computed once and looked up by sample index;
    - augmentation with `views` (Fast Knowledge Distillation, Shen & Xing 2022): a fixed set of V
      augmented views of the training set is drawn up front, the teacher's logits on each are
      computed once, `cached` [V, N, K], and `fit` replays those exact views (epoch e: view
      e mod V, announced through `set_epoch`), so no teacher forward runs during training;
    - augmentation without views: the teacher runs on every augmented batch (a step then costs
      a student step plus a teacher forward: 1.7x on ResNet-20 -> ResNet-8, measured on the 2-core reference machine).
    """

    teacher: nn.Module  # on the training device
    temperature: float
    alpha: float
    amp: bool = False  # online teacher forwards in the device's autocast dtype
    cached: torch.Tensor | None = None  # [N, K] or [V, N, K] teacher logits, on the device
    views: torch.Tensor | None = None  # [V, N, 3] int16 augmentation parameters, for `fit`
    view: int = 0  # the view the current epoch replays
    heads: Heads | None = None  # multi-task: KD per head (bonsai.losses.kd_loss)

    def set_epoch(self, epoch: int) -> None:
        """Called by `fit` at the start of each epoch (like DistributedSampler.set_epoch)."""
        self.view = epoch % len(self.views) if self.views is not None else 0

    def targets(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits [B, K] for the samples `idx` as augmented in `x`."""
        if self.cached is None:
            with torch.no_grad(), autocast(x.device, self.amp):
                return self.teacher(x).float()
        if self.cached.dim() == 3:
            return self.cached[self.view, idx]
        return self.cached[idx]

    def __call__(self, logits, y, idx, x):
        return kd_loss(logits, self.targets(idx, x), y, self.temperature, self.alpha, self.heads)


def draw_views(n: int, h: int, mode: str, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` augmented views of an n-image training set: [count, n, 3] int16 parameters."""
    return torch.stack([draw_augment(n, h, mode, gen) for _ in range(count)])


def teacher_view_logits(
    teacher: nn.Module,
    data: DataBundle,
    views: torch.Tensor,
    *,
    amp: bool = False,
    channels_last: bool = False,
    batch_size: int = 512,
) -> torch.Tensor:
    """The teacher's eval-mode logits on every view: [V, N, K] float32, computed and returned
    on the teacher's device (the views are augmented there too)."""
    dev = device_of(teacher)
    fill = black_fill(data).to(dev)
    out = []
    for v in views:
        chunks = []
        for i in range(0, len(data.train_x), batch_size):
            x = data.train_x[i : i + batch_size].to(dev)
            x = apply_augment(x, v[i : i + batch_size], fill)
            chunks.append(
                predict_logits(teacher, x, batch_size, amp=amp, channels_last=channels_last)
            )
        out.append(torch.cat(chunks))
    return torch.stack(out)


def distillation_loss(
    teacher: nn.Module,
    data: DataBundle,
    augment: str,
    temperature: float,
    alpha: float,
    *,
    teacher_views: int = 0,
    amp: bool = False,
    channels_last: bool = False,
    gen: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> DistillationLoss:
    """A `fit` loss that distills from `teacher` (frozen, eval mode); see `DistillationLoss`.

    `teacher_views` > 0 with augmentation: precompute the teacher's logits on that many fixed
    augmented views (drawn from `gen`) and replay them. `amp`/`channels_last`: run the teacher's
    forwards (cached or online) in bf16 / NHWC, like the student. `device`: where the student
    trains (`fit(device=...)`); the teacher moves there and its cached logits are kept there.
    """
    teacher.to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if augment == "none":
        cached = predict_logits(teacher, data.train_x, amp=amp, channels_last=channels_last)
        cached = cached.to(device)  # [N, K]: small; the images stay where they are
        return DistillationLoss(teacher, temperature, alpha, amp, cached, heads=data.heads)
    if teacher_views > 0:
        if gen is None:
            raise ValueError("replaying teacher views needs the run's generator (gen)")
        h = data.train_x.shape[2]
        views = draw_views(len(data.train_x), h, augment, teacher_views, gen)
        cached = teacher_view_logits(teacher, data, views, amp=amp, channels_last=channels_last)
        return DistillationLoss(teacher, temperature, alpha, amp, cached, views, heads=data.heads)
    if channels_last:  # online: the teacher stays NHWC, like the batches `fit` feeds it
        teacher.to(memory_format=torch.channels_last)
    return DistillationLoss(teacher, temperature, alpha, amp, heads=data.heads)
