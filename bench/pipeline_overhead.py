"""Benchmark: what the pipeline itself costs (issue 14, item 6).

    .venv/bin/python bench/pipeline_overhead.py [--rounds 3] [--out docs/pipeline_overhead.json] [ARGS]
    .venv/bin/python bench/pipeline_overhead.py --render docs/pipeline_overhead.json

The same stages two ways, in alternating rounds (plain flow, flow plain, ...), each in a fresh
process on a fresh store; the ratio is taken per round and reported as its median and min-max:

- plain: a script calling the library as a user would by hand: compose the config, load the
  data, run each stage through the store's cache (`bonsai.build.run_stage`: build, evaluate
  with `bonsai.measure.evaluate`, keyed records and locks), compare all variants side by side
  (`bonsai.measure.compare`). No Prefect, no MLflow.
- flow: `python -m flows.compress ARGS`: the same stages and measurements as Prefect tasks, with
  MLflow tracking (runs, params, logged models, plots) and the pre-flight checks.

ARGS (Hydra overrides) default to none: the default run on digits. The extra wall time of the
flow is split into where it goes: process start and imports, the temporary Prefect server,
tracking around each stage (child runs, logged models, records), the comparison and the exit,
read from the flow's own MLflow runs and records. Target (issue 14): the flow adds at most 10%
or 15 s, whichever is larger.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain(overrides: list[str], work: Path) -> dict:
    """The stages by plain library calls; returns the time spent in each part."""
    t: dict[str, float] = {}
    import numpy as np
    import torch

    from bonsai.build import Built, run_stage
    from bonsai.config import validate_config
    from bonsai.data import load_data
    from bonsai.measure.compare import Variant, compare
    from bonsai.store import Store
    from flows.compose import compose_config
    from flows.compress import _threads, apply_caps

    t["imports"] = time.perf_counter() - T_START
    t0 = time.perf_counter()
    cfg, plan = validate_config(apply_caps(compose_config(overrides)))
    data = load_data(cfg.data)
    t["config and data"] = time.perf_counter() - t0
    torch.set_num_threads(_threads(cfg, plan)[1])  # as the flow sets it
    store = Store(work / "store")
    eval_cfg = cfg.eval.model_dump(
        include={"threads", "warmup", "repeats", "batch_size", "footprint"}
    )
    done: dict[str, Built] = {}
    variants = []
    t["stages"] = t["evaluation"] = 0.0
    for s in plan.stages:
        b = run_stage(
            store, s.name, s.kind, s.params, data,
            input=done.get(s.input) if s.input else None,
            teacher=done.get(s.teacher) if s.teacher else None,
            seed=s.seed(cfg.seed), eval_cfg=eval_cfg, log=lambda m: None,
        )  # fmt: skip
        done[s.name] = b
        assert b.record is not None
        ev = b.record.evaluation
        t["stages"] += b.record.stage_seconds
        t["evaluation"] += ev.seconds
        latency_model = store.latency_model(b.key, b.artifact.kind)
        variants.append(
            Variant(s.name, s.kind, ev.metrics, np.asarray(ev.predictions), latency_model)
        )
    t0 = time.perf_counter()
    compare(
        variants,
        plan.reference,
        data.test_x[:1].numpy(),
        threads=cfg.eval.threads,
        rounds=cfg.eval.compare_rounds,
        per_round=cfg.eval.compare_repeats,
    )
    t["comparison"] = time.perf_counter() - t0
    return t


def run_plain(overrides: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix="bonsai-plain-") as work:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--plain-child", work, "--", *overrides],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"plain run failed:\n{proc.stderr[-3000:]}")
    parts = json.loads(proc.stdout.strip().splitlines()[-1])
    parts["exit"] = wall - sum(parts.values())
    return wall, parts


def run_flow(overrides: list[str]) -> tuple[float, dict]:
    from bench._common import duration, pipeline_runs, stage_runs

    with tempfile.TemporaryDirectory(prefix="bonsai-flow-") as store:
        t_wall0 = time.time()
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "flows.compress", *overrides, f"tracking.store_dir={store}",
             "runtime.progress=false"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        t_end = time.time()
        if proc.returncode:
            raise SystemExit(f"flow run failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout + proc.stderr
        parent = pipeline_runs(Path(store))[-1]
        children = stage_runs(Path(store), parent.info.run_id)
        build = sum(r.data.metrics["stage_seconds"] for r in children)
        evaluation = sum(r.data.metrics.get("eval_seconds", 0.0) for r in children)
        in_children = sum(duration(r) for r in children)
        first_child = min(r.info.start_time for r in children) / 1000
        last_child = max(r.info.end_time for r in children) / 1000
        start = parent.info.start_time / 1000
        # The Prefect server's start, from its log lines' clock times.
        server = _server_seconds(out)
    parts = {
        "imports, config, data (before the flow)": start - t_wall0 - server,
        "Prefect server start": server,
        "flow start to first stage": first_child - start,
        "stages": build,
        "evaluation": evaluation,
        "tracking around stages (runs, models, records)": in_children - build - evaluation,
        "between stages (Prefect scheduling)": (last_child - first_child) - in_children,
        "comparison, plots, end of flow": parent.info.end_time / 1000 - last_child,
        "exit": t_end - parent.info.end_time / 1000,
    }
    return wall, parts


def _server_seconds(log: str) -> float:
    """Seconds between 'Starting temporary server' and the flow run's first line."""
    import re

    stamps = {}
    for line in log.splitlines():
        m = re.match(r"(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| (.*)", line)
        if not m:
            continue
        secs = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        if "Starting temporary server" in m[4]:
            stamps.setdefault("start", secs)
        elif "Beginning flow run" in m[4]:
            stamps.setdefault("ready", secs)
    if len(stamps) < 2:
        return 0.0  # a Prefect server given by PREFECT_API_URL: nothing started
    return (stamps["ready"] - stamps["start"]) % 86400


def render(result: dict) -> str:
    """The doc's tables (Markdown) from the bench's JSON."""
    import statistics

    walls, n = result["walls"], len(result["walls"]["plain"])
    ratios = [f / p for p, f in zip(walls["plain"], walls["flow"], strict=True)]
    extras = [f - p for p, f in zip(walls["plain"], walls["flow"], strict=True)]
    plain_s, flow_s = statistics.median(walls["plain"]), statistics.median(walls["flow"])
    extra = statistics.median(extras)
    allowed = max(0.10 * plain_s, 15.0)
    lines = [
        f"## Pipeline overhead: {result['what']}, {n} rounds, alternating "
        f"({', '.join(result['orders'])})",
        "",
        "| | plain library calls | Prefect flow + MLflow |",
        "|---|---|---|",
        "| command wall time, per round | "
        + " / ".join(f"{x:.1f}" for x in walls["plain"]) + " s | "
        + " / ".join(f"{x:.1f}" for x in walls["flow"]) + " s |",
        f"| median | {plain_s:.1f} s | {flow_s:.1f} s |",
        f"| ratio per round: median (min-max) | 1.00 | {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}) |",
        "",
        f"extra per round: median {extra:+.1f} s ({min(extras):+.1f} to {max(extras):+.1f}); "
        f"allowed: {allowed:.1f} s (10% or 15 s, whichever is larger) -> "
        f"{'met' if extra <= allowed else 'MISSED'}"
        + ("" if n >= 3 else " (fewer than 3 rounds: a smoke check, not a measurement)"),
        "",
    ]  # fmt: skip
    for name in ("plain", "flow"):
        lines += [f"| {name}: where the time goes (mean of the rounds) | s |", "|---|---|"]
        lines += [f"| {k} | {v / n:.1f} |" for k, v in result["parts"][name].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (3 or more)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    ap.add_argument("--render", type=Path, help="print the tables of a saved JSON, and stop")
    ap.add_argument("--plain-child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.plain_child:
        print(json.dumps(plain(args.overrides, args.plain_child)))
        return
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    walls: dict[str, list[float]] = {"plain": [], "flow": []}
    parts: dict[str, dict] = {}
    orders = []
    runs = {"plain": run_plain, "flow": run_flow}
    for i in range(args.rounds):
        order = ("plain", "flow") if i % 2 == 0 else ("flow", "plain")
        orders.append(" ".join(order))
        for name in order:
            wall, p = runs[name](args.overrides)
            walls[name].append(wall)
            parts[name] = p if name not in parts else {k: parts[name][k] + v for k, v in p.items()}
            print(f"round {i + 1}: {name} {wall:.1f} s", flush=True)
    result = {
        "what": " ".join(args.overrides) or "the default run (digits)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "orders": orders,
        "walls": walls,
        "parts": parts,
    }
    print()
    print(render(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
