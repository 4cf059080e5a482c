"""Where training runs: `runtime.device` resolved to a torch device, and what each device type
runs in (autocast dtype, gradient scaling, cuDNN autotuning).

    dev = resolve_device("auto")        # cuda:0 when torch sees a CUDA device, else cpu
    with autocast(dev, enabled=True):   # cpu: bf16 (AMX/avx512_bf16; else off), cuda: bf16 or fp16
        logits = model(x)

What runs on the device: training, distillation (the teacher's forwards and cached logits
included), fine-tuning after pruning or factorization, and QAT fine-tuning. What stays on the
CPU: model building, pruning and factorization themselves, the evaluator (onnxruntime on CPU),
exports and saving: `bonsai.training.fit` moves a model to the device and back, so artifacts
are the same in form whichever device trained them.

`auto` picks CUDA only: Apple's MPS backend is taken when asked for (`mps`), not by default,
because its operator coverage still has gaps (an op it lacks fails the stage mid-run) and the
small models Bonsai trains gain little there over the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from bonsai.errors import ConfigError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    return torch.backends.mps.is_available()


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch build has no CUDA support (torch {torch.__version__})"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device "
        "(torch.cuda.is_available() is False: no GPU, no driver, or CUDA_VISIBLE_DEVICES empty)"
    )


def resolve_device(requested: str) -> torch.device:
    """The torch device `runtime.device` names: `auto` is cuda:<current> when torch sees a CUDA
    device, else cpu. `cuda` or `mps` where there is none raises ConfigError (one line: what was
    found, and the fix), before any compute."""
    if requested not in DEVICES:
        raise ConfigError(
            f"runtime.device: unknown device {requested!r}; valid: {', '.join(DEVICES)}"
        )
    if requested == "cpu":
        return torch.device("cpu")
    if requested in ("auto", "cuda"):
        if cuda_available():
            return torch.device("cuda", torch.cuda.current_device())
        if requested == "auto":
            return torch.device("cpu")
        raise ConfigError(
            f"runtime.device=cuda, but {_no_cuda_reason()}; use runtime.device=auto (a GPU "
            "when there is one, else the CPU) or runtime.device=cpu"
        )
    if mps_available():
        return torch.device("mps")
    raise ConfigError(
        f"runtime.device=mps, but torch {torch.__version__} finds no MPS device "
        "(torch.backends.mps.is_available() is False: Apple silicon with macOS 12.3+ only); "
        "use runtime.device=auto or runtime.device=cpu"
    )


def describe(device: str | torch.device) -> str:
    """`cpu`, `mps`, or `cuda:0 (NVIDIA H100 80GB HBM3)`: what a manifest and a log line say."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)


def prepare(device: str | torch.device) -> torch.device:
    """Process-wide settings for training on `device`; returns it as a torch.device.

    CUDA: cuDNN autotuning (`benchmark`): every batch of a run has the same shape (but the
    last), so the fastest convolution algorithm found for the first one pays off."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dev


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters (else buffers) are; cpu for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def amp_dtype(device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of `amp: true` on this device; None: autocast stays off.

    cpu: bfloat16 where the CPU computes it natively (AMX or avx512_bf16: oneDNN's bf16 kernels;
    fp16 has no fast CPU kernels), else None: on an AVX2-only CPU bf16 is emulated, and a
    ResNet-18 training step on 8x8 digits took 38x longer under autocast than in fp32 (2-core
    AMD EPYC Milan, torch 2.14; `cpu_has_native_bf16`).
    cuda: bfloat16 where the GPU computes it natively (Ampere and later, compute capability
    >= 8), else float16 with a GradScaler (`grad_scaler`): bf16 emulated on older GPUs is slower
    than fp32. mps: off (fp32): its fp16 autocast needs gradient scaling that Bonsai does not
    use there, and the gain on small models is small.
    """
    kind = torch.device(device).type
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if kind == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (avx512_bf16 or AMX tiles), as torch reads
    CPUID. The CUDA rule's counterpart: bf16 emulated is slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume none, fp32 is never slow
        return False


def autocast(device: str | torch.device, enabled: bool):
    """The forward pass's mixed-precision context for `device` (see `amp_dtype`); a null
    context when `enabled` is False or the device has no autocast dtype."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device: str | torch.device, enabled: bool) -> torch.amp.GradScaler | None:
    """A GradScaler where autocast runs in float16 (its small exponent range underflows small
    gradients without loss scaling); None otherwise (bf16 has fp32's range)."""
    if not enabled or amp_dtype(device) != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)
