"""Benchmark: one CIFAR-10-shaped ResNet-20 teacher epoch on a CUDA GPU against the CPU, through
Bonsai's own training code (`runtime.device`, issue 19).

    .venv/bin/python bench/gpu_epoch.py                                  # generated data, cuda vs cpu
    .venv/bin/python bench/gpu_epoch.py --data-root ../shared/data/cifar10   # real CIFAR-10 JPEGs
    .venv/bin/python bench/gpu_epoch.py --devices cpu --train 2000       # a check without a GPU

Each device trains the `train` stage of `experiment=cifar10_resnet` (ResNet-20, SGD + Nesterov,
lr 0.15, batch 128, pad-4 crop + flip, amp, channels_last, one-cycle) through
`bonsai.build.run_stage(..., device=...)`: model build, `bonsai.training.fit` (the training split
moved to the device once, autocast in the device's dtype: bf16 on the CPU and on Ampere or later
GPUs, fp16 with a GradScaler on older ones), MAC count and safetensors save, all in the stage's
time, as a pipeline run pays them. Before the timed run each device trains a short warm-up
stage (CUDA context, cuDNN autotuning, oneDNN kernels), so the table shows steady-state epochs.

Data: generated CIFAR-shaped images (3x32x32, 10 classes, 50,000 train / 10,000 test: oriented
gratings plus noise, `data=synthetic`), or the CIFAR-10 JPEGs in ImageFolder layout with
`--data-root` (decoded once and cached as uint8 under `--cache-dir`). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bonsai, not an installed one

import torch  # noqa: E402
import yaml  # noqa: E402

from bench._common import CIFAR10_CACHE  # noqa: E402
from bonsai.build import run_stage  # noqa: E402
from bonsai.data import DataBundle, load_data  # noqa: E402
from bonsai.devices import amp_dtype, describe, resolve_device  # noqa: E402
from bonsai.errors import ConfigError  # noqa: E402


def teacher_recipe(epochs: int) -> dict:
    """The teacher stage of conf/experiment/cifar10_resnet.yaml, ResNet-20 from conf/teacher/."""
    experiment = yaml.safe_load((ROOT / "conf/experiment/cifar10_resnet.yaml").read_text())
    model = yaml.safe_load((ROOT / "conf/teacher/resnet20.yaml").read_text())
    return {**experiment["pipeline"]["stages"]["teacher"], "model": model, "epochs": epochs}


def load(args) -> DataBundle:
    if args.data_root:
        return load_data(
            {
                "name": "imagefolder",
                "root": args.data_root,
                "image_size": 32,
                "cache_dir": args.cache_dir,
                "max_train": args.train,
            }
        )
    return load_data(
        {
            "name": "synthetic",
            "num_classes": 10,
            "num_train": args.train or 50_000,
            "num_test": 10_000,
            "channels": 3,
            "image_size": 32,
        }
    )


def time_stage(data: DataBundle, recipe: dict, device: str, seed: int) -> tuple[float, dict]:
    """Seconds of one `train` stage on `device`, and its artifact's manifest."""
    out = Path(tempfile.mkdtemp(prefix="bonsai-gpu-epoch-"))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    built = run_stage(
        out, "teacher", "train", recipe, data,
        seed=seed, evaluate=False, log=lambda m: None, device=device,
    )  # fmt: skip
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, built.artifact.meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cuda,cpu", help="comma-separated runtime.device values")
    ap.add_argument("--data-root", default=None, help="CIFAR-10 JPEGs (ImageFolder layout)")
    ap.add_argument("--cache-dir", default=str(CIFAR10_CACHE), help="decoded-image cache")
    ap.add_argument("--train", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs per device")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    requested = [d.strip() for d in args.devices.split(",") if d.strip()]
    try:
        devices = [str(resolve_device(d)) for d in requested]  # a missing GPU: said at once
    except ConfigError as e:
        print(f"gpu_epoch: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    data = load(args)
    print(f"# gpu_epoch: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.get_num_threads()} CPU "
        f"threads; devices: {', '.join(describe(d) for d in devices)}"
    )
    print(
        f"data: {len(data.train_x)} train / {len(data.test_x)} test images {data.input_shape} "
        f"({'CIFAR-10 from ' + args.data_root if args.data_root else 'generated'}), "
        f"loaded in {time.perf_counter() - t0:.1f} s"
    )
    recipe = teacher_recipe(args.epochs)
    print(f"recipe: {recipe}")

    warm = dataclasses.replace(data, train_x=data.train_x[:1024], train_y=data.train_y[:1024])
    rows = []
    for device in devices:
        time_stage(warm, {**recipe, "epochs": 1}, device, args.seed)  # warm-up, not timed
        seconds, meta = time_stage(data, recipe, device, args.seed)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
        history = meta["history"]
        rows.append(
            {
                "device": meta["trained_on"],
                "amp": str(amp_dtype(device)).removeprefix("torch.") if recipe["amp"] else "off",
                "s_epoch": seconds / args.epochs,
                "img_s": len(data.train_x) * args.epochs / seconds,
                "loss": history[-1]["loss"],
                "acc": history[-1]["train_acc"],
                "peak": peak,
            }
        )
        print(f"  {meta['trained_on']}: {seconds:.1f} s", flush=True)

    cpu = next((r["s_epoch"] for r in rows if r["device"] == "cpu"), None)
    print()
    print(
        "| device | autocast | s/epoch | images/s | speedup vs cpu | last epoch loss | train acc % | GPU peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{cpu / r['s_epoch']:.1f}x" if cpu else "-"
        peak = f"{r['peak']:.0f}" if r["peak"] is not None else "-"
        print(
            f"| {r['device']} | {r['amp']} | {r['s_epoch']:.2f} | {r['img_s']:,.0f} | {speedup} "
            f"| {r['loss']:.4f} | {r['acc']:.2f} | {peak} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
