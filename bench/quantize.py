"""Benchmark: fp32 against every quantization mode, on a teacher-sized model, as a user runs it.

    python bench/quantize.py                  # digits (the default run's data and teacher), then CIFAR-10
    python bench/quantize.py digits           # only the digits default
    python bench/quantize.py cifar            # only the CIFAR-10 budget run
    python bench/quantize.py cifar --epochs 3 --width 32 --max-test 10000   # the defaults

Runs `python -m flows.compress pipeline=ptq` plus a `quantize.qat` stage on the teacher, so that
one pipeline holds: the teacher (torch), its fp32 ONNX export, static int8, dynamic int8, fp16
(each from the export) and QAT int8 (from the teacher). Reads the stage runs back from MLflow and
prints, per variant: accuracy, its delta against its fp32 parent and against the teacher, bytes,
zipped bytes, p50 latency (batch 1, 1 thread, all variants timed side by side in alternating
rounds), speedup against the fp32 export and against the teacher, and the speed guard's own
verdict (measured in the stage, against the stage's fp32 parent).

Target (CIFAR-10): the teacher-sized model's best int8 variant is at least 2x faster than its
fp32 parent and at most 0.5 points below it. The CIFAR-10 run needs the JPEG copy in ImageFolder
layout (`--data`, default $BONSAI_CIFAR10_ROOT or ../shared/data/cifar10 beside the checkout) and
is budgeted to at most 30 minutes in all on the 2-core reference machine (run nothing else
heavy beside it: side-by-side jobs slow each other far more than 2x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bonsai, not another installed copy
sys.path.insert(0, str(ROOT / "bench"))
from _common import CIFAR10_CACHE, CIFAR10_ROOT, duration, pipeline_runs, run_cli, stage_runs  # noqa: E402

INT8 = ("int8", "dynamic", "qat")  # the int8 variants the target is about
PARENT = {"int8": "onnx", "dynamic": "onnx", "fp16": "onnx", "qat": "teacher"}
TARGET_SPEEDUP, TARGET_DROP = 2.0, 0.5
# Stages one at a time, each with every core: torch's thread count is set once per process, and
# with two branches at once the teacher and QAT training would get one core each.
ONE_AT_A_TIME = "runtime.max_workers=1"


def qat_stage(**params) -> str:
    """A `+pipeline.stages.qat={...}` override: QAT of the teacher, beside the ptq branches."""
    items = {"kind": "quantize.qat", "input": "teacher", **params}
    return "+pipeline.stages.qat={" + ",".join(f"{k}:{v}" for k, v in items.items()) + "}"


def digits_args(args) -> list[str]:
    # The default run's data and teacher (ResNet-18 on sklearn digits), all modes side by side.
    return ["pipeline=ptq", ONE_AT_A_TIME, qat_stage(epochs=3, lr=1e-4)]


def cifar_args(args) -> list[str]:
    # A teacher-sized plain CNN: the cnn_large family (3 stages of 2 convs) at width 32
    # (32-64-128 channels, 289k parameters, 39M MACs at 32x32): the size of a CIFAR ResNet-20
    # CIFAR teacher (272k). Measured on this shared machine: width 64 (1.15M, 154M MACs) trained
    # at 2.0 s per batch of 128, 13 minutes an epoch: over the 30-minute budget before QAT.
    return [
        "pipeline=ptq",
        ONE_AT_A_TIME,
        "teacher=cnn_large",
        f"teacher.width={args.width}",
        "data=imagefolder",
        f"data.root={args.data}",
        f"data.cache_dir={args.cache}",
        f"data.max_test={args.max_test}",
        f"pipeline.stages.teacher.epochs={args.epochs}",
        "pipeline.stages.teacher.lr=0.003",
        "pipeline.stages.teacher.batch_size=128",
        "pipeline.stages.teacher.augment=shift_flip",
        "pipeline.stages.teacher.weight_decay=5e-4",
        "pipeline.stages.teacher.optimizer=adamw",
        # Teacher-sized variants: 0.5 points is the target, 1.0 the gate.
        "pipeline.stages.int8.tolerance=1.0",
        qat_stage(epochs=args.qat_epochs, lr=1e-4, batch_size=128, amp="true", tolerance=1.0),
    ]


def rows_from(store: Path) -> tuple[list[dict], float]:
    [parent] = pipeline_runs(store)
    rows = []
    for r in stage_runs(store, parent.info.run_id):
        m = r.data.metrics
        rows.append(
            {
                "stage": r.data.tags["bonsai.stage"],
                "kind": r.data.params["kind"],
                **m,
                "seconds": duration(r),
            }
        )
    return rows, duration(parent)


def table(rows: list[dict]) -> str:
    by = {r["stage"]: r for r in rows}
    p50 = {s: r["paired_latency_p50_ms"] for s, r in by.items()}
    order = ["teacher", "onnx", "int8", "dynamic", "fp16", "qat"]
    head = (
        "| variant | kind | acc % | Δ vs fp32 parent pts | Δ vs teacher pts | bytes | zipped | "
        "p50 ms | speedup vs fp32 | speedup vs teacher | guard (stage) |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for s in order:
        if s not in by:
            continue
        r = by[s]
        parent = PARENT.get(s)
        d_parent = r["accuracy"] - by[parent]["accuracy"] if parent else 0.0
        guard = ""
        if "speed_guard_ok" in r:
            verdict = "ok" if r["speed_guard_ok"] >= 1 else "FAIL"
            guard = f"{verdict} ({r['speedup_vs_parent']:.2f}x)"
        vs_fp32 = p50["onnx"] / p50[s] if s != "teacher" else float("nan")
        lines.append(
            f"| {s} | {r['kind']} | {r['accuracy']:.2f} | {d_parent:+.2f} | "
            f"{r['accuracy'] - by['teacher']['accuracy']:+.2f} | {r['bytes']:,.0f} | "
            f"{r['zipped_bytes']:,.0f} | {p50[s]:.4f} | "
            + (f"{vs_fp32:.2f}x" if s != "teacher" else "—")
            + f" | {r['speedup']:.2f}x | {guard} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    by = {r["stage"]: r for r in rows}
    fp32 = by["onnx"]
    cands = []
    for s in INT8:
        if s not in by:
            continue
        r = by[s]
        speedup = fp32["paired_latency_p50_ms"] / r["paired_latency_p50_ms"]
        drop = by[PARENT[s]]["accuracy"] - r["accuracy"]
        cands.append((s, speedup, drop, speedup >= TARGET_SPEEDUP and drop <= TARGET_DROP))
    lines = [
        f"  {s}: {speedup:.2f}x faster than its fp32 parent, accuracy {-drop:+.2f} points "
        f"against it: {'meets' if ok else 'misses'} the target"
        for s, speedup, drop, ok in cands
    ]
    head = (
        f"target (best int8 variant >= {TARGET_SPEEDUP:.0f}x faster than its fp32 parent and "
        f"at most {TARGET_DROP} points below it): {'MET' if any(c[3] for c in cands) else 'MISSED'}"
    )
    return "\n".join([head, *lines])


def run(name: str, overrides: list[str]) -> None:
    store = Path(tempfile.mkdtemp(prefix=f"bonsai-bench-quant-{name}-")) / "mlruns"
    t0 = time.perf_counter()
    wall = run_cli(store, overrides)
    rows, pipeline_s = rows_from(store)
    print(f"\n## {name}\n")
    print(f"command: python -m flows.compress {' '.join(overrides)}\n")
    print(table(rows))
    print("\n| stage | seconds (build + eval + logging) |\n|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']:.1f} |")
    print(
        f"\npipeline {pipeline_s:.0f} s; command {wall:.0f} s; bench {time.perf_counter() - t0:.0f} s"
    )
    if name == "cifar":
        print(verdict(rows))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # (checked below: Python 3.11's argparse checks an empty nargs="*" against `choices`)
    ap.add_argument("which", nargs="*", help="digits and/or cifar (default: both)")
    ap.add_argument("--data", default=str(CIFAR10_ROOT), help="CIFAR-10 JPEG root")
    ap.add_argument("--cache", default=str(CIFAR10_CACHE), help="decoded-image cache")
    ap.add_argument("--epochs", type=int, default=3, help="CIFAR-10 teacher epochs")
    ap.add_argument("--width", type=int, default=32, help="CIFAR-10 teacher width (cnn_large: 64)")
    ap.add_argument("--qat-epochs", type=int, default=1, help="CIFAR-10 QAT epochs")
    ap.add_argument("--max-test", type=int, default=10000, help="CIFAR-10 test images (stratified)")
    args = ap.parse_args()
    unknown = set(args.which) - {"digits", "cifar"}
    if unknown:
        ap.error(f"unknown run(s) {sorted(unknown)}; choose digits and/or cifar")
    t0 = time.perf_counter()
    for which in args.which or ["digits", "cifar"]:
        if which == "cifar" and not Path(args.data, "train").is_dir():
            print(f"\n## cifar\n\nskipped: {args.data}/train not found (--data)")
            continue
        run(which, digits_args(args) if which == "digits" else cifar_args(args))
    print(f"\nall runs: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
