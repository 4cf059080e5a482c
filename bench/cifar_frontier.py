"""Benchmark: the CIFAR-10 compression frontier, Bonsai against a hand-written baseline measured in
the same session (issues 14 and 21).

    .venv/bin/python bench/cifar_frontier.py --rounds 3          # hours; nothing else heavy beside it
    .venv/bin/python bench/cifar_frontier.py --scale 0.2 --trials 0   # every epoch count x 0.2: ~25 min
    .venv/bin/python bench/cifar_frontier.py --report-only          # re-time a finished run
    .venv/bin/python bench/cifar_frontier.py --render docs/cifar10_frontier.json  # doc from JSON
    # --data DIR: another CIFAR-10 JPEG copy (default $BONSAI_CIFAR10_ROOT or ../shared/data/cifar10
    # beside the checkout); --cache DIR (default .cache/cifar10); --store DIR (.cache/frontier)

1. Bonsai, through the command line a user types, so every number is also an MLflow run:
   `python -m flows.compress experiment=cifar10_frontier` (a CIFAR ResNet-20 teacher, then every
   technique from it: pipeline `frontier`), and with `--trials N` the Optuna recipe search
   (`-m search=cifar10_recipes`, "most accurate model of at most 110 KB", every trial reusing the
   cached teacher). `--scale F` multiplies every stage's epochs (both sides).
2. The hand-written baseline (`bench/baseline/cifar.py`: plain torch, torch-pruning and
   onnxruntime) in this process, on the same training images (the validation split held out as
   Bonsai holds it out), with the same epochs and learning rates: a ResNet-20 teacher, a ResNet-8
   from scratch and one distilled from the teacher, the teacher pruned and fine-tuned with KD, and
   static int8 of each. Its models and results are kept under the store (`handwritten-*`) and
   reused by `--report-only`.
3. Every ONNX file of both sides timed in this one process: onnxruntime, batch 1, 1 thread,
   `--rounds` rounds of `--repeats` runs of each model, every round made of 10 sub-rounds that
   interleave the models (the order reverses each sub-round). A speedup is taken per
   round (the side's fp32 teacher's median over the variant's in the same round) and reported as
   the median with its min-max over the rounds; `teacher` and `teacher_onnx` are the same bytes
   timed twice, so their spread is the noise of the measurement.
4. The JSON (`--out`, default docs/), from which the table, the goals and the plot are written,
   replacing the section between the frontier markers in docs/benchmarks.md (`--doc`); `--render
   JSON` does it again from a saved JSON: text and table come from the same numbers.

The data: CIFAR-10 as JPEG (quality 75) in ImageFolder layout (--data), decoded once into --cache.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import CIFAR10_CACHE, CIFAR10_ROOT, client, run_cli, train_uint8  # noqa: E402

TEACHER_BUDGET_S = 30 * 60
BASELINE_STAGES = ("teacher", "scratch", "student", "pruned")
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- cifar_frontier: begin -->", "<!-- cifar_frontier: end -->"


def frontier_stages(overrides: list[str] | None = None) -> dict[str, dict]:
    """pipeline=frontier's stages as experiment=cifar10_frontier composes them (conf/): the
    epochs --scale multiplies, and the recipes the baseline copies."""
    from flows.compose import compose_config

    return compose_config(["experiment=cifar10_frontier", *(overrides or [])])["pipeline"]["stages"]


def scaled_epochs(scale: float) -> dict[str, int]:
    return {k: max(1, round(st["epochs"] * scale))
            for k, st in frontier_stages().items() if "epochs" in st}  # fmt: skip


def _overrides(args) -> list[str]:
    out = [
        "experiment=cifar10_frontier",
        f"data.root={args.data}",
        f"data.cache_dir={args.cache}",
        "runtime.progress=false",
        # One stage at a time, each with every core, as the baseline trains its models: then a
        # stage's time compares with the hand-written model's (by default independent branches
        # run side by side, splitting the cores, and each stage's own time grows).
        "runtime.max_workers=1",
    ]
    if args.max_train:
        out.append(f"data.max_train={args.max_train}")
    if args.scale != 1.0:
        out += [f"pipeline.stages.{k}.epochs={v}" for k, v in scaled_epochs(args.scale).items()]
    return out


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


def baseline(args, out: Path) -> list[dict]:
    """Run the hand-written baseline (or read a finished one from `out`); one dict per model."""
    import numpy as np

    results = out / "results.json"
    if results.is_file():
        print(f"hand-written baseline: reusing {out}", flush=True)
        rows = json.loads(results.read_text())
        for r in rows:
            r["latency_model"] = str(out / Path(r["latency_model"]).name)
            r["predictions"] = np.asarray(r["predictions"])
        return rows
    if args.report_only:
        raise SystemExit(f"no hand-written baseline in {out}: run without --report-only")
    import torch

    from bench.baseline.cifar import Images, Recipe, run
    from bonsai.data import load_data
    from flows.compose import compose_config

    # The images and recipes of Bonsai's run: its composed config (the same overrides).
    raw = compose_config(_overrides(args))
    data = load_data(raw["data"])
    train = Images(train_uint8(data), data.train_y)
    test = Images.from_nhwc(data.raw_test, data.test_y.numpy())
    torch.set_num_threads(os.cpu_count() or 1)
    stages = raw["pipeline"]["stages"]
    keys = ("epochs", "lr", "warmup_epochs", "batch_size", "weight_decay", "temperature", "alpha")
    recipes = {n: Recipe(**{k: stages[n][k] for k in keys if k in stages[n]})
               for n in BASELINE_STAGES}  # fmt: skip
    print(f"hand-written baseline: {len(train.x)} training images, {recipes}", flush=True)
    built = run(train, test, out, recipes, prune_ratio=stages["pruned"]["ratio"])
    from bonsai.measure.evaluate import zipped_bytes

    rows = [{
        "stage": f"hand: {b.name}",
        "kind": "hand-written",
        "metrics": {"accuracy": b.accuracy, "params": b.params, "macs": b.macs,
                    "bytes": b.bytes, "zipped_bytes": zipped_bytes(b.onnx)},
        "predictions": b.predictions,
        "latency_model": str(b.onnx),
        "seconds": b.seconds,
    } for b in built]  # fmt: skip
    results.write_text(json.dumps(
        [{**r, "predictions": r["predictions"].tolist()} for r in rows], default=float
    ))  # fmt: skip
    return rows


def measure(variants: list[dict], args) -> list[dict]:
    """Time every variant's ONNX file in one process; rows with speedups per side."""
    import numpy as np

    from bonsai.measure.latency import measure_latency_paired
    from bonsai.onnx_utils import session

    sessions = {v["stage"]: session(v["latency_model"], 1) for v in variants}
    shape = next(iter(sessions.values())).get_inputs()[0].shape
    x1 = (
        np.random.default_rng(0)
        .standard_normal([d if isinstance(d, int) else 1 for d in shape])
        .astype(np.float32)
    )
    # Each round is 10 alternating sub-rounds of repeats/10 runs of every model, so that the
    # models of a round are timed interleaved over the same seconds: a drift of the machine
    # within a round (seconds long with 20 models) then moves them all alike.
    per_round: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        one = measure_latency_paired(sessions, x1, rounds=10, per_round=max(1, args.repeats // 10))
        for k, v in one.items():
            per_round[k].append(v["latency_p50_ms"])

    rows = []
    for v in variants:
        hand = v["stage"].startswith("hand: ")
        ref = next(r for r in variants if r["stage"] == ("hand: teacher" if hand else "teacher"))
        m, rm = v["metrics"], ref["metrics"]
        ratios = [a / b for a, b in zip(per_round[ref["stage"]], per_round[v["stage"]],
                                        strict=True)]  # fmt: skip
        row = {
            "side": "hand-written" if hand else "bonsai",
            "stage": v["stage"],
            "kind": v["kind"],
            **{
                k: m[k]
                for k in ("accuracy", "val_accuracy", "params", "macs", "bytes", "zipped_bytes")
                if k in m
            },  # fmt: skip
            "accuracy_delta": m["accuracy"] - rm["accuracy"],
            "agreement": 100
            * float(
                (np.asarray(v["predictions"]) == np.asarray(ref["predictions"])).mean()
            ),  # fmt: skip
            "latency_p50_ms": statistics.median(per_round[v["stage"]]),
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "size_ratio": rm["bytes"] / m["bytes"],
            "seconds": v["seconds"],
        }
        rows.append(row)
    return rows


COLS = [
    ("stage", "variant", "{}"),
    ("kind", "kind", "{}"),
    ("accuracy", "acc %", "{:.2f}"),
    ("accuracy_delta", "Δ pts", "{:+.2f}"),
    ("val_accuracy", "val %", "{:.2f}"),
    ("params", "params", "{:,.0f}"),
    ("macs", "MACs", "{:,.0f}"),
    ("bytes", "bytes", "{:,.0f}"),
    ("zipped_bytes", "zipped", "{:,.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.4f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("speedup_spread", "min-max", "{}"),
    ("size_ratio", "smaller", "{:.1f}x"),
    ("seconds", "stage s", "{:.0f}"),
]


def goals(rows: list[dict]) -> list[tuple[str, str, str, str, bool]]:
    """(goal, Bonsai, hand-written, gap, met) for issue 14's four goals, both sides measured."""
    by = {r["stage"]: r for r in rows}

    def side(hand: bool) -> list[dict]:
        return [r for r in rows if r["stage"].startswith("hand: ") == hand]

    def teacher(r):
        return f"{r['accuracy']:.2f}% in {r['seconds'] / 60:.1f} min"

    def deployable(rs):  # ONNX files: Bonsai's exports and int8, the baseline's int8
        return [r for r in rs if r["kind"].startswith(("quantize", "export"))
                or r["stage"].endswith("_int8")]  # fmt: skip

    def within_one(rs):
        near = [r for r in deployable(rs) if r["accuracy_delta"] >= -1.0]
        return max(near, key=lambda r: min(r["size_ratio"] / 5, r["speedup"] / 2.5), default=None)

    def tiny(rs):
        return max((r for r in deployable(rs) if r["size_ratio"] >= 10),
                   key=lambda r: r["accuracy_delta"], default=None)  # fmt: skip

    def kd_vs_scratch(kd, sc):
        if not (kd and sc):
            return "not built", None, None
        d = kd["accuracy"] - sc["accuracy"]
        return (f"{kd['accuracy']:.2f}% ({kd['seconds']:.0f} s) vs {sc['accuracy']:.2f}% "
                f"({sc['seconds']:.0f} s): {d:+.2f} pts", d, kd["seconds"] / sc["seconds"])  # fmt: skip

    out = []
    t, ht = by["teacher"], by.get("hand: teacher")
    met = t["accuracy"] >= 87.0 and t["seconds"] <= TEACHER_BUDGET_S
    gap = "; ".join(x for x in (
        f"{t['accuracy'] - 87.0:+.2f} pts" if t["accuracy"] < 87.0 else "",
        f"+{(t['seconds'] - TEACHER_BUDGET_S) / 60:.1f} min" if t["seconds"] > TEACHER_BUDGET_S else "",
    ) if x)  # fmt: skip
    out.append(("teacher >= 87% within 30 min", teacher(t), teacher(ht) if ht else "", gap, met))
    best, hb = within_one(side(False)), within_one(side(True))

    def fmt1(r):
        return (f"{r['stage']}: {r['size_ratio']:.1f}x smaller, {r['speedup']:.2f}x faster, "
                f"{r['accuracy_delta']:+.2f} pts") if r else "none within 1 pt"  # fmt: skip

    met = best is not None and best["size_ratio"] >= 5 and best["speedup"] >= 2.5
    out.append(("within 1.0 pt: >= 5x smaller and >= 2.5x faster", fmt1(best), fmt1(hb),
                "" if met or best is None else f"{best['size_ratio'] / 5:.2f} of the size goal, "
                f"{best['speedup'] / 2.5:.2f} of the speed goal", met))  # fmt: skip
    best, hb = tiny(side(False)), tiny(side(True))

    def fmt2(r):
        return (f"{r['stage']}: {r['size_ratio']:.1f}x smaller, {r['accuracy_delta']:+.2f} pts"
                if r else "none 10x smaller")  # fmt: skip

    met = best is not None and best["accuracy_delta"] >= -3.0
    out.append((">= 10x smaller: at most 3.0 pts lost", fmt2(best), fmt2(hb),
                "" if met or best is None else f"{best['accuracy_delta'] + 3.0:+.2f} pts", met))  # fmt: skip
    ours, d, ratio = kd_vs_scratch(by.get("student"), by.get("scratch"))
    theirs, _, _ = kd_vs_scratch(by.get("hand: student"), by.get("hand: scratch"))
    if d is not None:
        equal = ratio <= 1.05  # "equal wall time", within 5%
        gap = "; ".join(x for x in ("" if d >= 1.0 else f"{d - 1.0:+.2f} pts",
                                    "" if equal else f"KD took {ratio:.2f}x the time") if x)  # fmt: skip
        out.append(("KD student beats scratch by >= 1.0 pt at equal wall time", ours, theirs,
                    gap, d >= 1.0 and equal))  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    # An ONNX export has its torch model's accuracy and size: one point for both.
    rows = [r for r in rows if not r["stage"].endswith("_onnx")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    style = {
        "bonsai": ("o", "tab:blue"),
        "search": ("D", "tab:green"),
        "hand-written": ("x", "tab:red"),
    }
    for ax, key, label in (
        (axes[0], "size_ratio", "times smaller than its side's fp32 teacher"),
        (axes[1], "speedup", "times faster than its side's fp32 teacher\n(onnxruntime, batch 1, "
                             "1 thread; bars: min-max over the rounds)"),
    ):  # fmt: skip
        # Variants on (nearly) the same spot share one label, e.g. "teacher_int8 / qat".
        spots: dict[tuple, list[dict]] = {}
        for r in rows:
            spot = (r["side"], round(math.log(r[key]), 1), round(r["accuracy"]))
            spots.setdefault(spot, []).append(r)
        for (side_, _, _), group in spots.items():
            for r in group:
                kind = "search" if r["stage"].startswith("search") else side_
                marker, color = style[kind]
                if key == "speedup":
                    ax.errorbar(r[key], r["accuracy"], color=color, zorder=2, fmt="none",
                                xerr=[[r[key] - r["speedup_min"]], [r["speedup_max"] - r[key]]])  # fmt: skip
                ax.scatter(r[key], r["accuracy"], s=60, marker=marker, color=color, zorder=3)
            hand = side_ == "hand-written"
            ax.annotate(
                " / ".join(g["stage"] for g in group),
                (group[0][key], group[0]["accuracy"]),
                fontsize=7,
                color="tab:red" if hand else "black",
                xytext=(5, -11 if hand else 5),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        lo, hi = min(r[key] for r in rows), max(r[key] for r in rows)
        ticks = (0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 15, 20)
        ax.set_xticks([t for t in ticks if 0.8 * lo <= t <= 1.3 * hi])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3, which="both")
    axes[0].set_ylabel("top-1 accuracy on the 10,000 test images (%)")
    searched = any(r["stage"].startswith("search") for r in rows)
    handles = [
        plt.Line2D([], [], marker=m, ls="", color=c, label=lab)
        for (kind, (m, c)), lab in zip(style.items(), ("Bonsai, pipeline frontier",
                                                       "Bonsai, recipe search",
                                                       "hand-written baseline, same session"),
                                       strict=True)
        if kind != "search" or searched
    ]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("CIFAR-10: accuracy against size and speed (ratios vs each side's fp32 teacher)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict) -> str:
    """The doc's section (Markdown) from the bench's JSON: the table, the noise, the goals."""
    from bonsai.measure.compare import format_table

    rows = [{**r, "speedup_spread": f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}"}
            for r in result["rows"]]  # fmt: skip
    cfg = result["config"]
    same = next((r for r in rows if r["stage"] == "teacher_onnx"), None)
    lines = [
        f"Measured {result['date']} ({result['machine']}): `{result['command']}`; "
        f"epochs {json.dumps(cfg['epochs'])} on both sides (scale {cfg['scale']:g} of the "
        f"frontier recipe); latency in {cfg['rounds']} alternating rounds of {cfg['repeats']} "
        "runs, one process, both sides.",
        "",
        format_table(rows, COLS),
        "",
    ]
    if same:
        lines.append(
            f"Noise: `teacher` and `teacher_onnx` are the same ONNX bytes timed twice; their "
            f"ratio reads {same['speedup']:.2f}x ({same['speedup_spread']} over the rounds), so "
            "speedups that differ by less than that spread are not told apart by this run."
        )
        lines.append("")
    by = {r["stage"]: r for r in rows}
    pairs = [(n, by[n]["seconds"], by[f"hand: {n}"]["seconds"]) for n in BASELINE_STAGES
             if n in by and f"hand: {n}" in by]  # fmt: skip
    if pairs:
        lines += [
            "Build seconds, Bonsai / hand-written (one run each, so no ratio is claimed from "
            "them; the training loops' per-epoch ratio, from alternating rounds, is in "
            '"Training speed" below): '
            + ", ".join(f"{n} {a:.0f} / {b:.0f}" for n, a, b in pairs)
            + ". Bonsai's include what its stages do beside training (the KD stages compute the "
            "teacher's outputs on 2 augmented views first; pruning builds the dependency graph).",
            "",
        ]
    lines += [
        "| goal | Bonsai | hand-written (same session) | gap | met |",
        "|---|---|---|---|---|",
        *(
            f"| {g['goal']} | {g['bonsai']} | {g['baseline']} | {g['gap']} | "
            f"{'yes' if g['met'] else 'no'} |"
            for g in result["goals"]
        ),  # fmt: skip
    ]
    if result.get("failed"):
        lines += ["", *(f"FAILED: {s}: {why}" for s, why in result["failed"])]
    if result.get("search"):
        lines += ["", "Search trials: " + "; ".join(
            f"{t['run']} -> {t['winner'] or 'no variant met the policy'}" for t in result["search"]
        )]  # fmt: skip
    walls = result.get("walls") or {}
    if walls:
        lines += ["", "Wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())]
    return "\n".join(lines)


def write_doc(result: dict, json_path: Path, doc: Path) -> None:
    """Redraw the plot beside the JSON and replace the doc's frontier section."""
    plot(result["rows"], json_path.with_suffix(".png"))
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} section to replace")
    head, tail = text.split(BEGIN, 1)[0], text.split(END, 1)[1]
    doc.write_text(f"{head}{BEGIN}\n{render(result)}\n{END}{tail}")
    print(f"{doc}: frontier section rewritten from {json_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / ".cache" / "frontier", help="MLflow store")
    ap.add_argument("--data", default=str(CIFAR10_ROOT), help="CIFAR-10 JPEG root")
    ap.add_argument("--cache", default=str(CIFAR10_CACHE), help="decoded-image cache")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's epochs")
    ap.add_argument("--max-train", type=int, help="train on this many images (quick checks)")
    ap.add_argument("--trials", type=int, default=3, help="search trials (0: no search)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating latency rounds (>= 3)")
    ap.add_argument("--repeats", type=int, default=1000, help="timed runs per model per round")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the plot and JSON")
    ap.add_argument(
        "--doc", type=Path, default=DOC, help="doc whose frontier section --out rewrites"
    )
    ap.add_argument("--report-only", action="store_true", help="only read the store")
    ap.add_argument(
        "--render", type=Path, help="rewrite the doc and plot from a saved JSON, and stop"
    )
    args = ap.parse_args()
    if args.render:
        write_doc(json.loads(args.render.read_text()), args.render, args.doc)
        return
    if args.rounds < 3:
        print("note: fewer than 3 rounds: a smoke check, not a measurement", flush=True)
    if not 0 < args.scale <= 1:
        raise SystemExit(f"--scale must be in (0, 1], got {args.scale}")
    store = args.store.resolve()
    walls = {}
    if not args.report_only:
        print(f"python -m flows.compress {' '.join(_overrides(args))}", flush=True)
        walls["bonsai frontier"] = run_cli(store, _overrides(args), stage_failures_ok=True)
        print(f"  {walls['bonsai frontier']:.0f} s", flush=True)
        if args.trials:
            search = ["-m", *_overrides(args), "search=cifar10_recipes",
                      f"hydra.sweeper.n_trials={args.trials}"]  # fmt: skip
            print(f"python -m flows.compress {' '.join(search)}", flush=True)
            walls["bonsai search"] = run_cli(store, search, stage_failures_ok=True)
            print(f"  {walls['bonsai search']:.0f} s", flush=True)
    saved = args.out / "cifar10_frontier.json" if args.out else None
    if args.report_only and saved and saved.is_file():
        # Re-timing a finished run: the command wall times are those of the run that built it.
        walls = json.loads(saved.read_text()).get("walls") or {}
    variants, seconds, search, failed = gather(store)
    t0 = time.perf_counter()
    hand = baseline(args, store / f"handwritten-x{args.scale:g}-n{args.max_train or 'all'}")
    if not args.report_only:
        walls["hand-written"] = time.perf_counter() - t0
    rows = measure(variants + hand, args)
    for r in rows:
        if r["stage"] in seconds:
            r["seconds"] = seconds[r["stage"]]
    result = {
        "date": str(datetime.date.today()),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        # The flags that decide the numbers (paths stay out: they are this machine's).
        "command": f"python bench/cifar_frontier.py --scale {args.scale:g} --trials "
        f"{args.trials} --rounds {args.rounds} --repeats {args.repeats}"
        + (f" --max-train {args.max_train}" if args.max_train else "")
        + " --out docs",
        "config": {
            "scale": args.scale,
            "epochs": scaled_epochs(args.scale),
            "max_train": args.max_train,
            "rounds": args.rounds,
            "repeats": args.repeats,
        },  # fmt: skip
        "rows": rows,
        "goals": [
            dict(zip(("goal", "bonsai", "baseline", "gap", "met"), x, strict=True))
            for x in goals(rows)
        ],  # fmt: skip
        "search": search,
        "failed": failed,
        "walls": walls,
    }
    print(render(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "cifar10_frontier.json"
        path.write_text(json.dumps(result, indent=1, default=float))
        write_doc(result, path, args.doc)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")
