"""Benchmark: the default pipeline as a user runs it, end to end, with wall time per stage.

    python bench/default_run.py                 # the README's default run, in a fresh store
    python bench/default_run.py teacher=cnn_large pipeline.stages.student.epochs=5

Runs `python -m flows.compress` in a subprocess (process start, imports, the temporary Prefect
server and the MLflow store creation included), then reads the stage runs back from MLflow and
prints the comparison table and the time each stage took. Target: the whole default run in at
most 180 s on the 2-core reference machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 180.0


def main(overrides: list[str]) -> int:
    from mlflow.tracking import MlflowClient

    store = Path(tempfile.mkdtemp(prefix="bonsai-bench-")) / "mlruns"
    cmd = [sys.executable, "-m", "flows.compress", f"tracking.store_dir={store}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        print(f"the run failed (exit {proc.returncode})")
        return 1

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("bonsai")
    [parent] = client.search_runs([exp.experiment_id], "tags.`bonsai.role` = 'pipeline'")
    stages = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages.sort(key=lambda r: r.info.start_time)
    table = Path(client.download_artifacts(parent.info.run_id, "comparison.md")).read_text()

    print(f"command: {' '.join(['python -m flows.compress', *overrides])}")
    print(table)
    print("\n| stage | kind | stage work s | stage + eval + logging s |")
    print("|---|---|---|---|")
    for r in stages:
        total = (r.info.end_time - r.info.start_time) / 1000
        print(
            f"| {r.data.tags['bonsai.stage']} | {r.data.params['kind']} | "
            f"{r.data.metrics['stage_seconds']:.1f} | {total:.1f} |"
        )
    flow_s = (parent.info.end_time - parent.info.start_time) / 1000
    print(
        f"\npipeline (parent run) {flow_s:.1f} s; whole command {wall:.1f} s "
        f"(target <= {TARGET_S:.0f} s: {'met' if wall <= TARGET_S else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
