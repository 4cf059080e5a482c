"""Benchmark: a cached re-run of the default pipeline against a running Prefect server vs with
the temporary server each command starts by default.

    python bench/service_rerun.py [ROUNDS]

Fills a store with one full default run, then re-runs the same command (every stage cached)
ROUNDS times (default 5) each way, alternating, so both ways share the machine's load. "command s"
is the wall time of the whole command as a user types it (process start, imports, Prefect and
MLflow included). Run nothing else heavy beside it on a shared machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PrefectServer, run_cli  # noqa: E402


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    store = Path(tempfile.mkdtemp(prefix="bonsai-bench-rerun-")) / "mlruns"
    os.environ.pop("PREFECT_API_URL", None)
    full = run_cli(store, [])
    print(f"full default run (fills the cache): {full:.1f} s", flush=True)
    times: dict[str, list[float]] = {"temporary server": [], "running server": []}
    with PrefectServer() as url:
        for _ in range(rounds):
            times["running server"].append(run_cli(store, []))
            os.environ.pop("PREFECT_API_URL")
            times["temporary server"].append(run_cli(store, []))
            os.environ["PREFECT_API_URL"] = url
    print()
    print("| Prefect | runs | command s (median) | min | max |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {len(t)} | {statistics.median(t):.1f} | {min(t):.1f} | {max(t):.1f} |")
    ratio = statistics.median(times["running server"]) / statistics.median(
        times["temporary server"]
    )
    print(f"\nrunning server / temporary server: {ratio:.2f}x the wall time")


if __name__ == "__main__":
    main()
