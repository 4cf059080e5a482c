"""Benchmark: Bonsai's training loop against a hand-written one on CIFAR-10 (issue 14, item 0).

    .venv/bin/python bench/train_speed.py            # 3 rounds x 5 epochs (nothing heavy beside it)
    .venv/bin/python bench/train_speed.py --rounds 5 # H B, B H, ...
    .venv/bin/python bench/train_speed.py --ablate   # + old knobs
    .venv/bin/python bench/train_speed.py --epochs 1 --max-train 2000             # a quick check

The run of the issue: a CIFAR ResNet-20, 5 epochs, SGD with Nesterov momentum 0.9, lr 0.15,
weight decay 5e-4, batch 128, pad-4 crop + flip, bf16 autocast, 2 threads, on the shared CIFAR-10
JPEG copy (decoded once and cached as uint8 .npy). Both loops train in one process on the same
data, from the same initial weights (seed 0), one after the other, in alternating rounds (at
least 3, `--rounds`: H B, B H, H B, ... so machine drift hits both; round r uses seed r for both
loops, so the accuracy means average over seeds), and both are evaluated by the same fp32
function on the 10,000 test images. The ratio is taken per round (the two loops of a round ran
back to back, under the same load) and reported as min / median / max over the rounds.

- hand-written: the loop of the hand-written baseline (bench/baseline/cifar.py, `fit`): channels_last
  model and batches, OneCycleLR with one warm-up epoch, augmentation on the raw uint8 images.
- bonsai: the `train` stage run through the library (`bonsai.build.run_stage(...,
  device="cpu")`: device resolution, model build, `bonsai.training.fit` with its device code
  path, MAC count and safetensors save included in its time) with the knobs
  `channels_last: true, schedule: onecycle, warmup_epochs: 1`.
- `--ablate` adds the stage with the knobs it had before (NCHW, cosine without warm-up).

Target (issue 14): Bonsai's seconds per epoch <= 1.05x the hand-written loop's, at equal or
better accuracy. Latency of the machine drifts +-30%: read the ratio, and the load averages.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bonsai, not an installed one
import torch  # noqa: E402

from bench._common import CIFAR10_CACHE, CIFAR10_ROOT, train_uint8  # noqa: E402
from bench.baseline.cifar import Images, Normalize, Recipe, fit  # noqa: E402
from bonsai.build import run_stage  # noqa: E402
from bonsai.data import DataBundle, load_data  # noqa: E402
from bonsai.measure.evaluate import top1  # noqa: E402
from bonsai.models import ResNetCifar  # noqa: E402
from bonsai.stages import get_stage  # noqa: E402
from bonsai.training import predict_logits  # noqa: E402

RECIPE = {
    "lr": 0.15,
    "batch_size": 128,
    "weight_decay": 5e-4,
    "optimizer": "sgd",
    "augment": "shift_flip",
    "amp": True,
}
NEW_KNOBS = {"channels_last": True, "schedule": "onecycle", "warmup_epochs": 1.0}
OLD_KNOBS = {"channels_last": False, "schedule": "cosine", "warmup_epochs": 0.0}


# ---------------------------------------------------------------------------------------------
# The hand-written loop: what a user writes with torch alone.


def handwritten(data: DataBundle, epochs: int, seed: int) -> tuple[torch.nn.Module, list[float]]:
    """Train a ResNet-20 with the hand-written baseline's loop (bench/baseline/cifar.py: channels_last
    model and batches, OneCycleLR with one warm-up epoch, augmentation on the raw uint8 images);
    returns the model and s per epoch."""
    torch.manual_seed(seed)
    model = ResNetCifar(3, 10, depth=20)
    train = Images(train_uint8(data), data.train_y)
    times = fit(model, train, Normalize(train), Recipe(epochs, lr=RECIPE["lr"]))
    return model, times


# ---------------------------------------------------------------------------------------------


def bonsai_train(data: DataBundle, epochs: int, seed: int, knobs: dict) -> tuple:
    """Bonsai's `train` stage through the library; returns the model and its wall time."""
    from bonsai.artifacts import load_torch

    cls = get_stage("train")
    config = cls.Config.model_validate(
        {
            "model": {"name": "resnet_cifar", "depth": 20},
            "epochs": epochs,
            **RECIPE,
            **knobs,
        }
    )
    out = Path(tempfile.mkdtemp(prefix="bonsai-train-speed-"))
    t0 = time.perf_counter()
    artifact = run_stage(
        out, "teacher", "train", config.model_dump(mode="json"), data,
        seed=seed, evaluate=False, log=lambda m: None, device="cpu",
    ).artifact  # fmt: skip
    assert artifact.meta["trained_on"] == "cpu", artifact.meta.get("trained_on")
    wall = time.perf_counter() - t0
    return load_torch(artifact), wall


def accuracy(model, data: DataBundle) -> float:
    """fp32 top-1 on the test split, in percent (the same function for every loop)."""
    return top1(predict_logits(model, data.test_x).argmax(1).numpy(), data.test_y.numpy())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(CIFAR10_ROOT), help="CIFAR-10 JPEG root")
    ap.add_argument("--cache-dir", default=str(CIFAR10_CACHE), help="decoded-image cache")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds, alternating the order (3 or more)"
    )
    ap.add_argument("--ablate", action="store_true", help="also the stage with its old knobs")
    ap.add_argument("--max-train", type=int, default=None, help="subsample (quick checks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of round 1 (round r: seed + r - 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data = load_data(
        {
            "name": "imagefolder",
            "root": args.root,
            "image_size": 32,
            "cache_dir": args.cache_dir,
            "max_train": args.max_train,
        }
    )
    load_s = time.perf_counter() - t0
    print(f"# train_speed: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{', '.join(isa)}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"data: {len(data.train_x)} train / {len(data.test_x)} test images {data.input_shape}, "
        f"loaded in {load_s:.1f} s (decoded uint8 cached under {args.cache_dir})"
    )
    print(f"recipe: ResNet-20, {args.epochs} epochs, {RECIPE}")

    runs = []
    variants = ["hand-written", "bonsai"] + (["bonsai (old knobs)"] if args.ablate else [])
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for name in order:
            load = os.getloadavg()[0]
            seed = args.seed + r  # both loops share a round's seed; rounds add seeds
            if name == "hand-written":
                model, times = handwritten(data, args.epochs, seed)
                total = sum(times)
                per_epoch = " ".join(f"{t:.1f}" for t in times)
            else:
                knobs = NEW_KNOBS if name == "bonsai" else OLD_KNOBS
                model, total = bonsai_train(data, args.epochs, seed, knobs)
                per_epoch = "(stage total / epochs)"
            acc = accuracy(model, data)
            runs.append((r + 1, name, total / args.epochs, total, acc, load, per_epoch))
            print(f"  round {r + 1} {name}: {total:.1f} s, {acc:.2f}%", flush=True)

    print()
    print(
        "| round | loop | s/epoch | total s | test acc % | load avg (1 min) at start | epochs s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r, name, spe, total, acc, load, per_epoch in runs:
        print(f"| {r} | {name} | {spe:.1f} | {total:.1f} | {acc:.2f} | {load:.2f} | {per_epoch} |")

    def mean(name, i):
        vals = [row[i] for row in runs if row[1] == name]
        return sum(vals) / len(vals)

    hand_acc = mean("hand-written", 4)

    def round_ratios(name):
        """Per round: this loop's s/epoch over the hand-written loop's in the same round."""
        hand = {row[0]: row[2] for row in runs if row[1] == "hand-written"}
        return [row[2] / hand[row[0]] for row in runs if row[1] == name]

    print()
    print("| loop | mean s/epoch | ratio per round: min | median | max | mean acc % | delta pts |")
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        s, a = mean(name, 2), mean(name, 4)
        r = round_ratios(name)
        print(
            f"| {name} | {s:.1f} | {min(r):.3f}x | {statistics.median(r):.3f}x | "
            f"{max(r):.3f}x | {a:.2f} | {a - hand_acc:+.2f} |"
        )
    ratio = statistics.median(round_ratios("bonsai"))
    delta = mean("bonsai", 4) - hand_acc
    verdict = "met" if ratio <= 1.05 and delta >= 0 else "MISSED"
    if args.rounds < 3:
        verdict += "; fewer than 3 rounds: a smoke check, not a measurement"
    print(
        f"\ntarget: bonsai <= 1.05x the hand-written s/epoch (median of {args.rounds} "
        f"alternating rounds) at equal or better accuracy: {ratio:.3f}x, {delta:+.2f} points "
        f"({verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
