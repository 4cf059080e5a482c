"""Benchmark: the default pipeline as a user runs it, end to end, with wall time per stage.

    python bench/default_run.py                 # the README's default run, in a fresh store
    python bench/default_run.py teacher=cnn_large pipeline.stages.student.epochs=5

Runs `python -m flows.compress` in a subprocess (process start, imports, the temporary Prefect
server and the MLflow store creation included), then reads the stage runs back from MLflow and
prints the comparison table and the time each stage took. Target: the whole default run in at
most 180 s on the 2-core reference machine.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import client, duration, pipeline_runs, run_cli, stage_runs  # noqa: E402

TARGET_S = 180.0


def main(overrides: list[str]) -> int:
    store = Path(tempfile.mkdtemp(prefix="bonsai-bench-")) / "mlruns"
    wall = run_cli(store, overrides)
    [parent] = pipeline_runs(store)
    stages = stage_runs(store, parent.info.run_id)
    table = Path(client(store).download_artifacts(parent.info.run_id, "comparison.md")).read_text()

    print(f"command: {' '.join(['python -m flows.compress', *overrides])}")
    print(table)
    print("\n| stage | kind | stage work s | stage + eval + logging s |")
    print("|---|---|---|---|")
    for r in stages:
        print(
            f"| {r.data.tags['bonsai.stage']} | {r.data.params['kind']} | "
            f"{r.data.metrics['stage_seconds']:.1f} | {duration(r):.1f} |"
        )
    verdict = "met" if wall <= TARGET_S else "MISSED"
    print(
        f"\npipeline (parent run) {duration(parent):.1f} s; whole command {wall:.1f} s "
        f"(target <= {TARGET_S:.0f} s: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
