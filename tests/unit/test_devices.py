"""`runtime.device`: how a request resolves (availability monkeypatched where this CPU machine
cannot show it), the autocast dtype and gradient scaling chosen per device, the float16 path of
the training loop (run here on the CPU with the scaler a pre-Ampere GPU gets), and a CPU run
that is the same whichever way the CPU was asked for."""

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bonsai.devices as devices
from bonsai.build import run_stage
from bonsai.errors import ConfigError
from bonsai.models import build_model
from bonsai.training import fit, predict_logits

CNN = {"name": "cnn", "width": 8}


def _ce(logits, y, _idx, _x):
    return F.cross_entropy(logits, y)


@pytest.fixture
def gpu(monkeypatch):
    """Make torch report a CUDA device 0 (named H100) without touching CUDA."""
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H100")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


# ---------------------------------------------------------------------------------------------
# Resolution


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_auto_is_the_cpu_on_this_machine():
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_auto_takes_cuda_when_torch_sees_it(gpu):
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert str(devices.resolve_device("cuda")) == "cuda:0"
    assert devices.resolve_device("cpu") == torch.device("cpu")  # asked for: kept
    assert devices.describe("cuda:0") == "cuda:0 (NVIDIA H100)"


def test_auto_never_picks_mps(monkeypatch, no_gpu):
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("mps") == torch.device("mps")


def test_cuda_without_a_gpu_is_refused_with_what_was_found_and_the_fix(no_gpu):
    with pytest.raises(ConfigError) as e:
        devices.resolve_device("cuda")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("runtime.device=cuda, but ")
    assert f"torch {torch.__version__}" in msg
    assert "use runtime.device=auto" in msg and "runtime.device=cpu" in msg


def test_mps_without_apple_silicon_is_refused(no_gpu):
    with pytest.raises(ConfigError, match=r"runtime\.device=mps, but .* finds no MPS device"):
        devices.resolve_device("mps")


def test_an_unknown_device_is_refused_by_the_config_schema():
    from bonsai.config import validate_config
    from flows.compose import compose_config

    with pytest.raises(ConfigError) as e:
        validate_config(compose_config(["runtime.device=gpu", "tracking.store_dir=/tmp/x"]))
    assert "runtime.device: Input should be 'auto', 'cpu', 'cuda' or 'mps' (got 'gpu')" in str(
        e.value
    )
    with pytest.raises(ConfigError, match="unknown device 'gpu'; valid: auto, cpu, cuda, mps"):
        devices.resolve_device("gpu")


# ---------------------------------------------------------------------------------------------
# Mixed precision per device


def test_autocast_dtype_per_device(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.amp_dtype("cpu") == torch.bfloat16  # AMX / avx512_bf16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.amp_dtype("cpu") is None  # AVX2 only: emulated bf16 is far slower than fp32
    assert devices.amp_dtype("mps") is None  # fp32 on Apple's GPUs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert devices.amp_dtype("cuda:0") == torch.bfloat16  # Ampere and later
    assert devices.grad_scaler("cuda:0", True) is None  # bf16 has fp32's range
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert devices.amp_dtype("cuda:0") == torch.float16  # e.g. a T4 or V100
    assert devices.grad_scaler("cpu", True) is None
    assert devices.grad_scaler("cuda:0", False) is None  # amp off: nothing to scale


def test_cpu_bf16_follows_the_cpus_instructions(monkeypatch):
    """What the kernel reports in /proc/cpuinfo and what torch reads from CPUID agree."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux
        flags = set(cpuinfo.read_text().split())
        native = bool({"avx512_bf16", "amx_tile", "amx_bf16"} & flags)
        assert devices.cpu_has_native_bf16() is native, sorted(f for f in flags if "avx" in f)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert devices.cpu_has_native_bf16() is False  # no probe: fp32, never the slow path


def test_autocast_context_follows_the_device(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    with devices.autocast("cpu", True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    with devices.autocast("cpu", True):
        assert not torch.is_autocast_enabled("cpu")
    with devices.autocast("cpu", False):
        assert not torch.is_autocast_enabled("cpu")
    with devices.autocast("mps", True):  # a null context: nothing is autocast
        assert not torch.is_autocast_enabled("cpu")


def test_cudnn_autotuning_is_switched_on_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    devices.prepare("cpu")
    assert torch.backends.cudnn.benchmark is False
    devices.prepare("cuda:0")  # sets a flag; touches no GPU
    assert torch.backends.cudnn.benchmark is True


def test_the_float16_path_trains_with_a_grad_scaler(synthetic, monkeypatch):
    """What a GPU without native bf16 runs (fp16 autocast, loss scaling, skipped overflow
    steps), exercised on the CPU, whose autocast also computes float16."""
    monkeypatch.setattr(devices, "amp_dtype", lambda device: torch.float16)
    steps = {"scaled": 0}
    real_step = torch.amp.GradScaler.step

    def counting_step(self, optimizer, *args, **kwargs):
        steps["scaled"] += 1
        return real_step(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", counting_step)
    torch.manual_seed(0)
    model = build_model(CNN, 1, 4)
    out_dtypes = set()
    hook = model.register_forward_hook(lambda _m, _i, out: out_dtypes.add(out.dtype))
    history = fit(
        model,
        synthetic,
        loss_fn=_ce,
        epochs=3,
        lr=2e-2,
        batch_size=64,
        amp=True,
        gen=torch.Generator().manual_seed(0),
        progress=False,
    )
    hook.remove()
    assert out_dtypes == {torch.float16}  # the forward ran in float16
    assert steps["scaled"] == 3 * 256 // 64  # every step went through the scaler
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    accuracy = (predict_logits(model, synthetic.test_x).argmax(1) == synthetic.test_y).float()
    assert accuracy.mean() > 0.9  # fp32 training of the same recipe: 99%


# ---------------------------------------------------------------------------------------------
# The CPU path and what a stage records


def _weights(built) -> str:
    return hashlib.sha256((built.artifact.path / "model.safetensors").read_bytes()).hexdigest()


def test_a_cpu_run_is_the_same_however_the_cpu_was_asked_for(synthetic, tmp_path):
    """A `train` and a `distill` (cached teacher logits, augmentation on the views, bf16) built
    with no device, `cpu` and `auto` give identical weights, histories and manifests; the
    manifest says where it trained."""
    train = {"model": CNN, "epochs": 2, "augment": "shift", "amp": True, "channels_last": True}
    distill = {**train, "teacher_views": 2}
    out = {}
    for device in (None, "cpu", "auto"):
        kw = {} if device is None else {"device": device}
        store = tmp_path / str(device)
        t = run_stage(store, "t", "train", train, synthetic, evaluate=False, log=print, **kw)
        s = run_stage(
            store, "s", "distill", distill, synthetic, teacher=t, evaluate=False, log=print, **kw
        )
        out[device] = (_weights(t), _weights(s), t.artifact.digest, s.artifact.digest)
        assert t.artifact.meta["trained_on"] == "cpu"
        assert s.artifact.meta["trained_on"] == "cpu"
    assert out[None] == out["cpu"] == out["auto"]


def test_a_stage_that_did_not_train_records_no_device(synthetic, tmp_path):
    t = run_stage(tmp_path, "t", "train", {"model": CNN, "epochs": 1}, synthetic, evaluate=False)
    p = run_stage(
        tmp_path, "p", "prune.unstructured", {"sparsity": 0.5, "epochs": 0}, synthetic,
        input=t, evaluate=False,
    )  # fmt: skip
    assert "trained_on" not in p.artifact.meta


def test_the_device_is_not_part_of_the_cache_key(synthetic, tmp_path):
    """A build made on one device is reused by a command on another (here: cpu, then auto)."""
    fast = {"warmup": 0, "repeats": 10, "footprint": False}
    params = {"model": CNN, "epochs": 1}
    first = run_stage(tmp_path, "t", "train", params, synthetic, eval_cfg=fast, device="cpu")
    again = run_stage(tmp_path, "t", "train", params, synthetic, eval_cfg=fast, device="auto")
    assert first.built and not again.built and first.key == again.key


def test_run_stage_refuses_a_missing_device_before_building(synthetic, tmp_path, no_gpu):
    with pytest.raises(ConfigError, match="runtime.device=cuda"):
        run_stage(tmp_path, "t", "train", {"model": CNN}, synthetic, device="cuda")
    assert not (tmp_path / "stages").exists()
