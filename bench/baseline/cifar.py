"""The hand-written CIFAR-10 baseline: what an ML engineer writes with torch, torch-pruning and
onnxruntime alone, without Bonsai. `bench/cifar_frontier.py` runs it in the same session as
Bonsai's variants, on the same images, with the same epochs and learning rates, and times every
ONNX file of both sides in one process; `bench/train_speed.py` times its training loop.

What it builds (`run`), each with its wall time:
- a ResNet-20 teacher trained on the labels;
- a ResNet-8 trained on the labels (scratch) and one distilled from the teacher (KD: Hinton's
  loss on the teacher's outputs for the same augmented batch, computed online);
- the teacher with a share of every layer's channels removed by torch-pruning (L2 norm of each
  channel group), then fine-tuned with KD;
- an ONNX export of each and static int8 of each (onnxruntime QDQ: per-channel int8 weights,
  uint8 activations, minmax calibration on training images, after `quant_pre_process`).

The one thing it shares with Bonsai is the architecture (`bonsai.models.ResNetCifar`, the CIFAR
ResNet of He et al. 2016), so that sizes and speeds compare like for like. Data arrives as the
uint8 images ([N, 32, 32, 3]) and labels; everything after that is in this file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# bf16 autocast where the CPU has bf16 instructions; emulated (AVX2-only CPUs) it is many times
# slower than fp32, so a careful hand-written loop leaves it off there (Bonsai's `amp` does too).
NATIVE_BF16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass
class Images:
    """uint8 [N, 3, 32, 32] images and int64 [N] labels."""

    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def from_nhwc(cls, x: np.ndarray, y: np.ndarray) -> Images:
        return cls(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                   torch.as_tensor(np.asarray(y), dtype=torch.int64))  # fmt: skip


@dataclass
class Recipe:
    epochs: int
    lr: float
    warmup_epochs: float = 1.0
    batch_size: int = 128
    weight_decay: float = 5e-4
    temperature: float = 4.0  # KD only
    alpha: float = 0.9  # KD only: weight of the soft loss


@dataclass
class Built:
    name: str
    model: torch.nn.Module | None  # fp32 torch model (None for int8 rows)
    onnx: Path
    seconds: float  # wall time of building it (training, pruning + fine-tuning, or quantizing)
    epoch_seconds: list[float] = field(default_factory=list)
    accuracy: float = 0.0  # top-1 % on the test images
    predictions: np.ndarray | None = None
    params: int = 0
    macs: int = 0
    bytes: int = 0  # the ONNX file


class Normalize:
    """Per-channel mean/std of the training images, applied to uint8 batches."""

    def __init__(self, train: Images):
        x = train.x.float() / 255
        self.mean = x.mean((0, 2, 3)).view(1, 3, 1, 1) * 255
        self.std = x.std((0, 2, 3)).view(1, 3, 1, 1) * 255

    def __call__(self, x_u8: torch.Tensor) -> torch.Tensor:
        return (x_u8.float() - self.mean) / self.std


def shift_flip(x_u8: torch.Tensor) -> torch.Tensor:
    """Pad 4 with black, random 32x32 crop, flip half: one gather on the uint8 batch."""
    b = len(x_u8)
    ar = torch.arange(32)
    padded = F.pad(x_u8, (4, 4, 4, 4))  # [b, 3, 40, 40]
    dy, dx = torch.randint(0, 9, (b,)), torch.randint(0, 9, (b,))
    cols = dx[:, None] + ar[None, :]
    cols = torch.where(torch.rand(b)[:, None] < 0.5, cols.flip(1), cols)
    rows = dy[:, None] + ar[None, :]
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def fit(
    model: torch.nn.Module,
    train: Images,
    norm: Normalize,
    recipe: Recipe,
    teacher: torch.nn.Module | None = None,
) -> list[float]:
    """SGD with Nesterov momentum, one-cycle schedule with a warm-up, pad-crop-flip, bf16
    autocast (where `NATIVE_BF16`) on channels_last. With `teacher`: KD on the teacher's
    outputs for the same batch.
    Returns seconds per epoch."""
    model.to(memory_format=torch.channels_last).train()
    if teacher is not None:
        teacher.to(memory_format=torch.channels_last).eval()
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                          weight_decay=recipe.weight_decay)  # fmt: skip
    n, bs = len(train.x), recipe.batch_size
    steps = (n + bs - 1) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=recipe.lr,
        total_steps=recipe.epochs * steps,
        pct_start=min(recipe.warmup_epochs / recipe.epochs, 0.5),
        cycle_momentum=False,
    )
    T = recipe.temperature
    times = []
    for _ in range(recipe.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            xb = norm(shift_flip(train.x[idx])).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=NATIVE_BF16):
                out = model(xb)
                if teacher is not None:
                    with torch.no_grad():
                        soft = teacher(xb)
            loss = F.cross_entropy(out.float(), train.y[idx])
            if teacher is not None:
                kd = F.kl_div(
                    F.log_softmax(out.float() / T, 1),
                    F.softmax(soft.float() / T, 1),
                    reduction="batchmean",
                ) * (T * T)
                loss = recipe.alpha * kd + (1 - recipe.alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        times.append(time.perf_counter() - t0)
    model.to(memory_format=torch.contiguous_format).eval()
    return times


def prune_channels(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """Remove `ratio` of every layer's channels (torch-pruning, L2 norm of each coupled group;
    the classifier's outputs kept)."""
    import torch_pruning as tp

    model.eval()
    pruner = tp.pruner.MetaPruner(
        model,
        torch.zeros(1, 3, 32, 32),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[m for m in model.modules() if isinstance(m, torch.nn.Linear)],
    )
    pruner.step()
    return model


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 32, 32),),
        str(path),
        dynamo=True,
        external_data=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    return path


def quantize_int8(src: Path, dst: Path, calib_x: np.ndarray) -> Path:
    """onnxruntime static int8 (QDQ, per-channel), calibrated on `calib_x` (normalized float32)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calib_x, max(1, len(calib_x) // 64)))

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"input": b}

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(
        str(pre), str(dst), Reader(),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )  # fmt: skip
    pre.unlink()
    return dst


def onnx_logits(path: Path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"input": x[i : i + batch]})[0]
                           for i in range(0, len(x), batch)])  # fmt: skip


def count(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, MACs of one 32x32 image)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, 32, 32))
    return int(params), int(macs)


def run(
    train: Images,
    test: Images,
    out: Path,
    recipes: dict[str, Recipe],
    prune_ratio: float = 0.3,
    calibration: int = 512,
    seed: int = 0,
    log=print,
) -> list[Built]:
    """Build every baseline model under `out`; `recipes` has teacher, scratch, student, pruned
    (the KD ones use temperature and alpha)."""
    from bonsai.models import ResNetCifar  # the architecture only (see the module's docstring)

    out.mkdir(parents=True, exist_ok=True)
    norm = Normalize(train)
    test_x = norm(test.x).numpy()
    g = torch.Generator().manual_seed(seed)
    calib_x = norm(train.x[torch.randperm(len(train.x), generator=g)[:calibration]]).numpy()
    built: list[Built] = []

    def finish(b: Built, model: torch.nn.Module | None = None) -> Built:
        logits = onnx_logits(b.onnx, test_x)
        b.predictions = logits.argmax(1)
        b.accuracy = 100 * float((b.predictions == test.y.numpy()).mean())
        b.bytes = b.onnx.stat().st_size
        if model is not None:
            b.params, b.macs = count(model)
        log(f"  hand-written {b.name}: {b.accuracy:.2f}%, {b.bytes:,} bytes, {b.seconds:.0f} s")
        built.append(b)
        return b

    def trained(name, depth, recipe, teacher=None, init=None):
        torch.manual_seed(seed)
        model = init if init is not None else ResNetCifar(3, 10, depth=depth)
        t0 = time.perf_counter()
        times = fit(model, train, norm, recipe, teacher)
        b = Built(name, model, export_onnx(model, out / f"{name}.onnx"),
                  time.perf_counter() - t0, times)  # fmt: skip
        return finish(b, model)

    def int8(parent: Built) -> Built:
        t0 = time.perf_counter()
        path = quantize_int8(parent.onnx, out / f"{parent.name}_int8.onnx", calib_x)
        b = Built(f"{parent.name}_int8", None, path, time.perf_counter() - t0)
        b.params, b.macs = parent.params, parent.macs
        return finish(b)

    teacher = trained("teacher", 20, recipes["teacher"])
    int8(teacher)
    int8(trained("scratch", 8, recipes["scratch"]))
    int8(trained("student", 8, recipes["student"], teacher=teacher.model))
    # Pruning: a copy of the teacher, channels removed, then KD fine-tuning from the teacher.
    t0 = time.perf_counter()
    pruned = ResNetCifar(3, 10, depth=20)
    pruned.load_state_dict(teacher.model.state_dict())
    prune_channels(pruned, prune_ratio)
    prune_s = time.perf_counter() - t0
    b = trained("pruned", 20, recipes["pruned"], teacher=teacher.model, init=pruned)
    b.seconds += prune_s
    int8(b)
    return built
