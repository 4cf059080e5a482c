"""Benchmark: the CIFAR-10 compression frontier against the hand-written baseline (issue 14).

    .venv/bin/python bench/cifar_frontier.py --out docs/benchmarks    # hours; nothing else heavy
    .venv/bin/python bench/cifar_frontier.py --store S --report-only     # tables from a store
    # --data DIR: another CIFAR-10 JPEG copy (default $BONSAI_CIFAR10_ROOT or ../shared/data/cifar10
    # beside the checkout); --cache DIR (default .cache/cifar10); --store DIR (.cache/frontier)

Everything runs through the command line a user types, so every number is also an MLflow run:

1. `python -m flows.compress experiment=cifar10_frontier`: a CIFAR ResNet-20 teacher trained by
   the pipeline (30 epochs, 25-40 min on 2 cores), then every technique from it (pipeline
   `frontier`: static int8, QAT, structured pruning + KD + int8, low-rank + KD, a ResNet-8 KD
   student + int8, and the same ResNet-8 trained from scratch for the same wall time).
2. `python -m flows.compress -m experiment=cifar10_frontier search=cifar10_recipes`: the Optuna
   recipe search ("most accurate model of at most 110 KB"), every trial reusing the cached
   teacher.
3. The table: every variant of step 1 and every search trial's winner, read from the store's
   records (accuracy on the 10,000 test images, params, MACs, bytes, zipped bytes), with
   onnxruntime batch-1 latency on 1 thread re-measured here for all of them in alternating
   rounds in this one process, so that speedups are ratios taken under the same load. Then the
   goals of issue 14 side by side with a hand-written baseline (typed in below), and a Pareto
   plot of accuracy against size and speed with the baseline's points.

The data: CIFAR-10 as JPEG (quality 75) in ImageFolder layout (--data), decoded once into --cache.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import CIFAR10_CACHE, CIFAR10_ROOT, client, run_cli  # noqa: E402

# A hand-written baseline, measured once on the reference machine by plain torch + onnxruntime
# scripts that are not in this repository: constants, not measurements of this run. Ratios are
# against its own fp32 teacher (25 epochs, against Bonsai's 30).
BASELINE = [
    # name, accuracy %, size ratio, speedup (midpoint of the measured range)
    ("ResNet-20 teacher fp32 (25 ep, 26.8 min)", 86.92, 1.0, 1.0),
    ("ResNet-20 teacher int8", 86.83, 3.3, 1.7),
    ("ResNet-8 scratch int8 (7 min)", 80.14, 10.6, 4.35),
    ("ResNet-8 KD int8 (7 min)", 79.88, 10.6, 4.2),
    ("ResNet-20 pruned 50% + KD", 82.42, 3.9, 1.65),
    ("ResNet-20 pruned 50% + KD, int8", 82.29, 9.2, 1.3),
]
TEACHER_BUDGET_S = 30 * 60


def _overrides(args) -> list[str]:
    return [
        "experiment=cifar10_frontier",
        f"data.root={args.data}",
        f"data.cache_dir={args.cache}",
        "runtime.progress=false",
    ]


def _records(store: Path) -> dict[str, tuple[str, object]]:
    """build id -> (key, record) for every record in the store."""
    from bonsai.store import Store, read_record

    s = Store(store)
    out = {}
    for p in sorted((store / "records").glob("*.json")):
        rec, _ = read_record(s, p.stem)
        if rec is not None:
            out[rec.build_id] = (p.stem, rec)
    return out


def gather(store: Path) -> tuple[list, dict, list[dict]]:
    """Variants to time (stage -> record), stage seconds, and the search trials."""
    from bonsai.store import Store
    from tasks.tracking import TAG_ARTIFACT_KIND, TAG_BUILD, TAG_ROLE, TAG_STAGE

    c = client(store)
    exp = c.get_experiment_by_name("bonsai")
    parents = c.search_runs(
        [exp.experiment_id],
        f"tags.`{TAG_ROLE}` = 'pipeline' and attributes.status != 'RUNNING'",
        max_results=1000,
        order_by=["attributes.start_time DESC"],
    )
    # The newest frontier run (a failed stage fails the run; its finished stages still count).
    frontier = [
        p
        for p in parents
        if p.data.tags.get("bonsai.pipeline") == "frontier" and p.info.status != "KILLED"
    ]
    if not frontier:
        raise SystemExit(f"no finished frontier run in {store}: run without --report-only")
    trials = [
        p
        for p in parents
        if p.data.tags.get("bonsai.pipeline") == "recipe" and p.info.status == "FINISHED"
    ]
    records = _records(store)
    s = Store(store)

    def variant(run, label):
        build = run.data.tags.get(TAG_BUILD)
        if build not in records:
            return None
        key, rec = records[build]
        kind = run.data.tags.get(TAG_ARTIFACT_KIND, "torch")
        return {
            "stage": label,
            "kind": rec.kind,
            "metrics": dict(rec.evaluation.metrics),
            "predictions": rec.evaluation.predictions,
            "latency_model": s.latency_model(key, kind),
            "seconds": rec.stage_seconds,
        }

    def children(parent_id):
        return c.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100
        )

    variants = []
    failed = []
    for run in children(frontier[0].info.run_id):
        stage = run.data.tags.get(TAG_STAGE, run.info.run_name)
        if run.info.status != "FINISHED":
            failed.append((stage, run.data.tags.get("bonsai.error", run.info.status)))
            continue
        v = variant(run, stage)
        if v:
            variants.append(v)
    order = [
        "teacher", "teacher_onnx", "teacher_int8", "qat", "pruned", "pruned_onnx", "pruned_int8",
        "lowrank", "scratch", "student", "student_onnx", "student_int8",
    ]  # fmt: skip
    variants.sort(key=lambda v: order.index(v["stage"]) if v["stage"] in order else 99)
    # Each search trial: the variant its promotion decision picked.
    promos = c.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'promote'", max_results=1000)
    winner_of = {}
    for p in promos:
        w = p.data.tags.get("bonsai.winner_run_id")
        if w:
            winner_of[c.get_run(w).data.tags.get("mlflow.parentRunId")] = w
    search = []
    for i, t in enumerate(sorted(trials, key=lambda r: r.info.start_time), 1):
        wid = winner_of.get(t.info.run_id)
        entry = {"trial": i, "run": t.info.run_name, "winner": None}
        if wid:
            run = c.get_run(wid)
            v = variant(run, f"search #{i} {run.data.tags.get(TAG_STAGE)}")
            if v:
                variants.append(v)
                entry["winner"] = v["stage"]
        search.append(entry)
    return variants, {v["stage"]: v["seconds"] for v in variants}, search, failed


def measure(variants: list[dict], args) -> list[dict]:
    import numpy as np

    from bonsai.measure.compare import Variant, compare
    from bonsai.onnx_utils import session

    # One input of the models' shape (the latency does not depend on the values).
    shape = session(variants[0]["latency_model"], 1).get_inputs()[0].shape
    x1 = (
        np.random.default_rng(0)
        .standard_normal([d if isinstance(d, int) else 1 for d in shape])
        .astype(np.float32)
    )
    vs = [
        Variant(v["stage"], v["kind"], v["metrics"], np.asarray(v["predictions"]),
                Path(v["latency_model"]))
        for v in variants
    ]  # fmt: skip
    return compare(vs, "teacher", x1, threads=1, rounds=args.rounds, per_round=args.repeats)


COLS = [
    ("stage", "variant", "{}"),
    ("kind", "kind", "{}"),
    ("accuracy", "acc %", "{:.2f}"),
    ("accuracy_delta", "Δ pts", "{:+.2f}"),
    ("params", "params", "{:,.0f}"),
    ("macs", "MACs", "{:,.0f}"),
    ("bytes", "bytes", "{:,.0f}"),
    ("zipped_bytes", "zipped", "{:,.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.4f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("size_ratio", "smaller", "{:.1f}x"),
    ("seconds", "stage s", "{:.0f}"),
]


def goals(rows: list[dict]) -> list[tuple[str, str, str, str, bool]]:
    """(goal, Bonsai, baseline, gap, met) for issue 14's four goals."""
    by = {r["stage"]: r for r in rows}
    t = by["teacher"]
    out = []
    met = t["accuracy"] >= 87.0 and t["seconds"] <= TEACHER_BUDGET_S
    out.append((
        "teacher >= 87% within 30 min",
        f"{t['accuracy']:.2f}% in {t['seconds'] / 60:.1f} min",
        "86.92% in 26.8 min",
        "" if met else "; ".join(
            x for x in (
                f"{t['accuracy'] - 87.0:+.2f} pts" if t["accuracy"] < 87.0 else "",
                f"+{(t['seconds'] - TEACHER_BUDGET_S) / 60:.1f} min"
                if t["seconds"] > TEACHER_BUDGET_S else "",
            ) if x
        ),
        met,
    ))  # fmt: skip
    deployable = [r for r in rows if r["kind"].startswith(("quantize", "export"))]
    near = [r for r in deployable if r["accuracy_delta"] >= -1.0]
    best = max(near, key=lambda r: min(r["size_ratio"] / 5, r["speedup"] / 2.5), default=None)
    met = best is not None and best["size_ratio"] >= 5 and best["speedup"] >= 2.5
    out.append((
        "within 1.0 pt: >= 5x smaller and >= 2.5x faster",
        f"{best['stage']}: {best['size_ratio']:.1f}x smaller, {best['speedup']:.2f}x faster, "
        f"{best['accuracy_delta']:+.2f} pts" if best else "no deployable variant within 1 pt",
        "teacher int8: 3.3x, 1.7x, -0.09 pts",
        "" if met or best is None else
        f"{best['size_ratio'] / 5:.2f} of the size goal, {best['speedup'] / 2.5:.2f} of the speed goal",
        met,
    ))  # fmt: skip
    tiny = [r for r in deployable if r["size_ratio"] >= 10]
    best = max(tiny, key=lambda r: r["accuracy_delta"], default=None)
    met = best is not None and best["accuracy_delta"] >= -3.0
    out.append((
        ">= 10x smaller: at most 3.0 pts lost",
        f"{best['stage']}: {best['size_ratio']:.1f}x smaller, {best['accuracy_delta']:+.2f} pts"
        if best else "no deployable variant 10x smaller",
        "ResNet-8 int8: 10.6x, -6.78 pts",
        "" if met or best is None else f"{best['accuracy_delta'] + 3.0:+.2f} pts",
        met,
    ))  # fmt: skip
    kd, sc = by.get("student"), by.get("scratch")
    if kd and sc:
        d = kd["accuracy"] - sc["accuracy"]
        ratio = kd["seconds"] / sc["seconds"]
        equal = ratio <= 1.05  # "equal wall time", within 5%
        out.append((
            "KD student beats scratch by >= 1.0 pt at equal wall time",
            f"{kd['accuracy']:.2f}% ({kd['seconds']:.0f} s) vs {sc['accuracy']:.2f}% "
            f"({sc['seconds']:.0f} s): {d:+.2f} pts",
            "79.88% vs 80.14% (7 min each): -0.26 pts int8; -0.4 fp32",
            "; ".join(x for x in (
                "" if d >= 1.0 else f"{d - 1.0:+.2f} pts",
                "" if equal else f"KD took {ratio:.2f}x the time",
            ) if x),
            d >= 1.0 and equal,
        ))  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    # An ONNX export has its torch model's accuracy and size: one point for both.
    rows = [r for r in rows if not r["stage"].endswith("_onnx")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    for ax, key, label in (
        (axes[0], "size_ratio", "times smaller than the fp32 teacher (log)"),
        (axes[1], "speedup", "times faster than the fp32 teacher (onnxruntime, batch 1, 1 thread)"),
    ):
        # Variants on (nearly) the same spot share one label, e.g. "teacher_int8 / qat".
        spots: dict[tuple, list[dict]] = {}
        for r in rows:
            spot = (round(math.log(r[key]), 1), round(r["accuracy"]))
            spots.setdefault(spot, []).append(r)
        for group in spots.values():
            for r in group:
                search = r["stage"].startswith("search")
                ax.scatter(
                    r[key],
                    r["accuracy"],
                    s=60,
                    marker="o" if not search else "D",
                    color="tab:green" if search else "tab:blue",
                    zorder=3,
                )
            r = group[0]
            ax.annotate(
                " / ".join(g["stage"] for g in group),
                (r[key], r["accuracy"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        idx = 2 if key == "size_ratio" else 3
        for b in BASELINE:
            ax.scatter(b[idx], b[1], s=70, marker="x", color="tab:red", zorder=3)
            ax.annotate(
                "hand: " + b[0].split(" (")[0],
                (b[idx], b[1]),
                fontsize=7,
                color="tab:red",
                xytext=(4, -9),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3, which="both")
    axes[0].set_ylabel("top-1 accuracy on the 10,000 test images (%)")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color="tab:blue", label="Bonsai, pipeline frontier"),
        plt.Line2D([], [], marker="D", ls="", color="tab:green", label="Bonsai, recipe search"),
        plt.Line2D([], [], marker="x", ls="", color="tab:red", label="hand-written baseline"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("CIFAR-10: accuracy against size and speed (ratios vs each one's fp32 teacher)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows, cols) -> str:
    from bonsai.measure.compare import format_table

    return format_table(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / ".cache" / "frontier", help="MLflow store")
    ap.add_argument("--data", default=str(CIFAR10_ROOT), help="CIFAR-10 JPEG root")
    ap.add_argument("--cache", default=str(CIFAR10_CACHE), help="decoded-image cache")
    ap.add_argument("--trials", type=int, default=3, help="search trials (0: no search)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="folder for the plot and JSON")
    ap.add_argument("--report-only", action="store_true", help="only read the store")
    ap.add_argument("--replot", type=Path, help="redraw the plot from a saved JSON, and stop")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return
    store = args.store.resolve()
    walls = {}
    if not args.report_only:
        print(f"python -m flows.compress {' '.join(_overrides(args))}", flush=True)
        walls["frontier"] = run_cli(store, _overrides(args), stage_failures_ok=True)
        print(f"  {walls['frontier']:.0f} s", flush=True)
        if args.trials:
            search = ["-m", *_overrides(args), "search=cifar10_recipes",
                      f"hydra.sweeper.n_trials={args.trials}"]  # fmt: skip
            print(f"python -m flows.compress {' '.join(search)}", flush=True)
            walls["search"] = run_cli(store, search, stage_failures_ok=True)
            print(f"  {walls['search']:.0f} s", flush=True)
    variants, seconds, search, failed = gather(store)
    rows = measure(variants, args)
    for r in rows:
        r["seconds"] = seconds[r["stage"]]
    print(f"\n## CIFAR-10 frontier ({datetime.date.today()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()})\n")  # fmt: skip
    print(table(rows, COLS))
    print("\nLatency: onnxruntime, batch 1, 1 thread, "
          f"{args.rounds} alternating rounds of {args.repeats} runs in this process; "
          "torch variants timed as their ONNX export. `stage s`: the stage's own wall time "
          "(fine-tuning stages include their teacher-view passes).")  # fmt: skip
    for stage, why in failed:
        print(f"\nFAILED: {stage}: {why}")
    print("\n## Search trials\n")
    for t in search:
        print(f"- trial {t['trial']}: {t['run']} -> {t['winner'] or 'no variant met the policy'}")
    print("\n## Goals (issue 14), against the hand-written baseline\n")
    g = goals(rows)
    print("| goal | Bonsai | hand-written | gap | met |\n|---|---|---|---|---|")
    for name, ours, base, gap, met in g:
        print(f"| {name} | {ours} | {base} | {gap} | {'yes' if met else 'no'} |")
    if walls:
        print("\nCommand wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(rows, args.out / "cifar10_frontier.png")
        keep = ("stage", "kind", *(k for k, _, _ in COLS[2:]))
        (args.out / "cifar10_frontier.json").write_text(json.dumps({
            "date": str(datetime.date.today()),
            "rows": [{k: r.get(k) for k in keep} for r in rows],
            "goals": [dict(zip(("goal", "bonsai", "baseline", "gap", "met"), x, strict=True)) for x in g],
            "search": search,
            "failed": failed,
            "walls": walls,
        }, indent=1, default=float))  # fmt: skip
        print(f"\nplot: {args.out / 'cifar10_frontier.png'}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")
