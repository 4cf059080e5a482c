"""Benchmark: what the stage cache saves, and sweeps run serially vs concurrently.

    python bench/cache_and_sweep.py

In a fresh store, for each way of reaching Prefect (the temporary server each command starts
by default, and a `prefect server start` that is already running):

1. the full default run;
2. the same command with only the int8 stage's parameters changed (teacher, student and onnx
   come from the cache); target: at most 15 % of the full run;
3. a 4-variant sweep over the student's temperature (teacher cached), run by Hydra's basic
   launcher (one job after another, 2 torch threads each) and by the joblib launcher
   (2 jobs at once, 1 torch thread each). Both recompute the same students (runtime.force).

"command s" is the wall time of the whole command as a user types it (process start, imports,
Prefect and MLflow included); "pipeline s" sums the parent runs' durations inside it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PrefectServer, duration, pipeline_runs, run_cli, stage_runs  # noqa: E402

TARGET = 0.15
SWEEP = ["-m", "pipeline.stages.student.temperature=1,2,4,8", "runtime.force=[student,onnx,int8]"]


def measure(mode: str) -> tuple[list[tuple], dict[str, float]]:
    store = Path(tempfile.mkdtemp(prefix="bonsai-bench-")) / "mlruns"
    rows = []

    def step(name: str, args: list[str]) -> tuple[float, list]:
        n = len(pipeline_runs(store)) if (store / "mlflow.db").exists() else 0
        wall = run_cli(store, args)
        runs = pipeline_runs(store)[n:]
        computed = sorted(
            {
                r.data.tags["bonsai.stage"]
                for p in runs
                for r in stage_runs(store, p.info.run_id)
                if r.data.tags.get("bonsai.cached") == "false"
            }
        )
        rows.append((mode, name, wall, sum(map(duration, runs)), len(runs), ", ".join(computed)))
        return wall, runs

    full_wall, [full] = step("full default run", [])
    rerun_wall, [rerun] = step(
        "int8 params changed", ["pipeline.stages.int8.calibration_samples=256"]
    )
    serial_wall, _ = step("4-variant sweep, serial", SWEEP)
    conc_wall, _ = step(
        "4-variant sweep, 2 at once", [*SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    )
    return rows, {
        "rerun_cmd": rerun_wall / full_wall,
        "rerun_pipeline": duration(rerun) / duration(full),
        "sweep_speedup": serial_wall / conc_wall,
    }


def main() -> int:
    results = {"temporary server": measure("temporary server")}
    with PrefectServer():
        results["running server"] = measure("running server")

    print("| Prefect | command | command s | pipeline s | pipeline runs | stages computed |")
    print("|---|---|---|---|---|---|")
    for rows, _ in results.values():
        for mode, name, wall, pipe, n, what in rows:
            print(f"| {mode} | {name} | {wall:.1f} | {pipe:.1f} | {n} | {what} |")
    print()
    for mode, (_, r) in results.items():
        verdict = "met" if r["rerun_cmd"] <= TARGET else "MISSED"
        print(
            f"{mode}: re-run = {r['rerun_cmd']:.1%} of the full command (target <= {TARGET:.0%}: "
            f"{verdict}), {r['rerun_pipeline']:.1%} of its pipeline time; "
            f"sweep 2-at-once vs serial: {r['sweep_speedup']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
