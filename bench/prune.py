"""Benchmark: structured pruning, unstructured sparsity and low-rank factorization, every variant
against its teacher, on digits (the pipelines as configured) and on a CIFAR-10 budget run.

    .venv/bin/python bench/prune.py            # both parts (run nothing else heavy beside it)
    .venv/bin/python bench/prune.py --only digits                             # one part
    .venv/bin/python bench/prune.py --only cifar --data DIR --cache DIR       # another copy

It drives the library directly (no Prefect, no MLflow): it composes conf/pipeline/{prune,
sparse,lowrank,chain}.yaml with Hydra overrides exactly as the command line would, validates
them with `flows.compress.prepare` (config, graph, data and the model checks), runs each plan's
stages in dependency order through `bonsai.build.run_stage` (the flow's cache and evaluator:
accuracy on the whole test split, params, MACs, bytes, zipped bytes, sparsity) and compares all
variants with `bonsai.measure.compare.compare`: onnxruntime batch-1 latency re-measured in alternating
rounds in one process, 1 thread, speedups against the teacher. A stage that several pipelines
declare identically (same kind, parameters, inputs and seed: the shared teacher) runs once: it
has one key in the bench's store.

CIFAR-10 budget run (JPEGs under `--data`, default $BONSAI_CIFAR10_ROOT or ../shared/data/cifar10
beside the checkout, decoded once into `--cache`, default .cache/cifar10): a 10,000-image training subset, the full 10,000-image test set, and as
teacher the plain CNN `cnn_large` with one conv per stage (64-128-256 channels, 40M MACs). Why
that teacher: at batch 1 in onnxruntime, narrow layers (8-16 channels) are dominated by
per-operator overhead, so thinning them buys little latency (measured here: a ResNet-20 pruned by
50% was only 1.4-1.9x faster); here every layer is >= 64 channels wide and still >= 32 after
halving, so compute dominates before and after pruning and removed MACs show up as removed
milliseconds. One conv per stage rather than two: the two-conv cnn_large (154M MACs) took
128 s per epoch of 10k images on this machine, which leaves no room in the 30-minute budget;
this one takes ~18 s. Target: structured pruning with KD fine-tuning >= 2x faster than its
unpruned input (the teacher) at most 1.5 points less accurate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bonsai, not an installed one
sys.path.insert(0, str(ROOT / "bench"))
from _common import CIFAR10_CACHE, CIFAR10_ROOT  # noqa: E402

PIPELINES = ("prune", "sparse", "lowrank", "chain")

# Digits: the pipelines exactly as configured (15-epoch ResNet-18 teacher, ...).
DIGITS: dict[str, list[str]] = {"common": [], **{p: [] for p in PIPELINES}}


def cifar_data(root: str, cache: str) -> list[str]:
    return [
        "data=imagefolder",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        "data.max_train=10000",
    ]


# Shared teacher: 15 epochs, bf16 autocast, shift+flip augmentation, AdamW + weight decay.
CIFAR_TEACHER = [
    "teacher=cnn_large",
    "teacher.convs_per_stage=1",
    "pipeline.stages.teacher.epochs=15",
    "pipeline.stages.teacher.lr=0.003",
    "pipeline.stages.teacher.batch_size=128",
    "pipeline.stages.teacher.optimizer=adamw",
    "pipeline.stages.teacher.weight_decay=0.05",
    "pipeline.stages.teacher.augment=shift_flip",
]
LEARN = ["batch_size=128", "amp=true"]
CIFAR: dict[str, list[str]] = {
    "common": CIFAR_TEACHER,  # + cifar_data(--data, --cache)
    # Half the channels of every layer, then 10 epochs of KD fine-tuning on augmented batches
    # (the teacher runs on each batch).
    "prune": [
        f"pipeline.stages.pruned.{k}"
        for k in ("epochs=10", "lr=0.002", "augment=shift_flip", *LEARN)
    ],
    # 80% zeros along the gradual schedule over 3 KD epochs (teacher logits cached).
    "sparse": [f"pipeline.stages.sparse.{k}" for k in ("epochs=3", *LEARN)],
    # 90% of each layer's energy, then 3 KD epochs (teacher logits cached).
    "lowrank": [f"pipeline.stages.lowrank.{k}" for k in ("epochs=3", *LEARN)],
}


def run_part(title: str, spec: dict[str, list[str]], pipelines, work: Path) -> None:
    import numpy as np

    from bonsai.build import Built, run_stage
    from bonsai.errors import BonsaiError
    from bonsai.measure.compare import Variant, compare, format_table
    from bonsai.store import Store
    from flows.compress import compose_config, prepare

    print(f"\n## {title}\n", flush=True)
    store = Store(work / "store")
    measured: set[str] = set()  # stage keys already among the variants (the shared teacher)
    variants: list[Variant] = []
    seconds: list[tuple[str, str, float, float]] = []
    targets: list[str] = []
    data = cfg = None
    for pipe in pipelines:
        overrides = [f"pipeline={pipe}", *spec["common"], *spec.get(pipe, [])]
        print(f"python -m flows.compress {' '.join(overrides)}", flush=True)
        raw = compose_config([*overrides, f"tracking.store_dir={store.root}"])
        _, cfg, plan, data = prepare(raw)
        eval_cfg = cfg.eval.model_dump(include={"threads", "warmup", "repeats", "batch_size"})
        done: dict[str, Built] = {}
        for s in plan.stages:
            if any(d and d not in done for d in (s.input, s.teacher)):
                continue  # its input failed
            # The same stage declared identically by several pipelines (the teacher) has one
            # key: bonsai.build runs it once and reuses it, as the flow's cache would.
            name = s.name if s.name == "teacher" else f"{pipe}-{s.name}"
            try:
                b = run_stage(
                    store, name, s.kind, s.params, data,
                    input=done.get(s.input) if s.input else None,
                    teacher=done.get(s.teacher) if s.teacher else None,
                    seed=s.seed(cfg.seed), eval_cfg=eval_cfg,
                    log=lambda m: print(f"    {m}", flush=True),
                )  # fmt: skip
            except BonsaiError as e:  # a stage gate (e.g. int8 accuracy): report, go on
                print(f"  {name} ({s.kind}) FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            done[s.name] = b
            if b.key in measured:
                continue
            measured.add(b.key)
            assert b.record is not None
            ev = b.record.evaluation
            latency_model = store.latency_model(b.key, b.artifact.kind)
            variants.append(
                Variant(name, s.kind, ev.metrics, np.asarray(ev.predictions), latency_model)
            )
            seconds.append((name, s.kind, b.record.stage_seconds, ev.seconds))
            print(
                f"  {name} ({s.kind}): {b.record.stage_seconds:.1f} s, accuracy "
                f"{ev.metrics['accuracy']:.2f}%",
                flush=True,
            )
            if s.kind == "prune.structured" and s.teacher and s.input == "teacher":
                targets.append(name)
    assert data is not None and cfg is not None
    x1 = data.test_x[:1].numpy()
    rows = compare(
        variants,
        "teacher",
        x1,
        threads=cfg.eval.threads,
        rounds=cfg.eval.compare_rounds,
        per_round=cfg.eval.compare_repeats,
    )
    print(
        f"\n{data.describe()['num_train']} training / {len(data.test_y)} test images of shape "
        f"{list(data.input_shape)}; latency: onnxruntime, batch 1, {cfg.eval.threads} thread, "
        f"{cfg.eval.compare_rounds} alternating rounds x {cfg.eval.compare_repeats} runs; "
        "speedup, smaller and Δacc against the teacher.\n"
    )
    print(format_table(rows))
    print("\n| variant | kind | stage s | eval s |\n|---|---|---|---|")
    for name, kind, st, ev_s in seconds:
        print(f"| {name} | {kind} | {st:.1f} | {ev_s:.1f} |")
    by_name = {r["stage"]: r for r in rows}
    for name in targets:
        r = by_name[name]
        ok = r["speedup"] >= 2.0 and r["accuracy_delta"] >= -1.5
        print(
            f"\ntarget (structured pruning + KD: >= 2x faster, <= 1.5 points below its unpruned "
            f"input): {name} is {r['speedup']:.2f}x faster, {r['accuracy_delta']:+.2f} points "
            f"-> {'met' if ok else 'MISSED'}"
        )
    best_sparse = [r for r in rows if r["kind"] == "prune.unstructured"]
    for r in best_sparse:
        ref = by_name["teacher"]
        print(
            f"{r['stage']}: sparsity {r['sparsity']:.1f}%, zipped bytes "
            f"{100 * (1 - r['zipped_bytes'] / ref['zipped_bytes']):.1f}% below the teacher's"
        )


def main(argv: list[str]) -> int:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["digits", "cifar"])
    parser.add_argument("--data", default=str(CIFAR10_ROOT), help="CIFAR-10 JPEG root")
    parser.add_argument("--cache", default=str(CIFAR10_CACHE), help="decoded-image cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)  # the machine's cores; onnxruntime timing uses eval.threads (1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bonsai-bench-prune-") as tmp:
        if args.only in (None, "digits"):
            run_part("digits (the pipelines as configured)", DIGITS, PIPELINES, Path(tmp) / "d")
        if args.only in (None, "cifar"):
            run_part(
                "CIFAR-10 budget run (10k train subset, full test set, 64-128-256-channel CNN teacher)",
                {**CIFAR, "common": [*cifar_data(args.data, args.cache), *CIFAR["common"]]},
                ("prune", "sparse", "lowrank"),
                Path(tmp) / "c",
            )
    print(f"\nwhole benchmark: {time.perf_counter() - t0:.0f} s (target <= 1800 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
