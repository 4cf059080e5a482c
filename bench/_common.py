"""Helpers shared by the benchmarks: run the CLI as a user would, read results from MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parent.parent
# CIFAR-10 as JPEG in ImageFolder layout ({train,test}/<class>/*.jpg): $BONSAI_CIFAR10_ROOT, else
# ../shared/data/cifar10 beside the checkout. Decoded images are cached under .cache/ in the
# checkout (git-ignored). Every bench that reads CIFAR-10 also takes these as flags.
CIFAR10_ROOT = Path(
    os.environ.get("BONSAI_CIFAR10_ROOT") or ROOT.parent / "shared" / "data" / "cifar10"
)
CIFAR10_CACHE = ROOT / ".cache" / "cifar10"


def train_uint8(data):
    """The training images of a loaded CIFAR-10 bundle back as uint8 [N, 3, H, W] (exact: the
    normalized images were k/255), as a hand-written script holds them after decoding."""
    import torch

    m = torch.tensor(data.mean).view(1, -1, 1, 1)
    s = torch.tensor(data.std).view(1, -1, 1, 1)
    return ((data.train_x * s + m) * 255).round().clamp(0, 255).to(torch.uint8).contiguous()


def run_cli(store: Path, args: list[str], stage_failures_ok: bool = False) -> float:
    """Run `python -m flows.compress ARGS` against `store`; return its wall time in seconds.
    With `stage_failures_ok`, exit 1 (a stage failed; the finished ones are cached and tracked)
    is reported in one line instead of stopping the benchmark."""
    cmd = [sys.executable, "-m", "flows.compress", *args, f"tracking.store_dir={store}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode == 1 and stage_failures_ok:
        errors = [x for x in proc.stderr.splitlines() if x.startswith("bonsai: error")]
        print("  exit 1: " + " | ".join(errors[-3:]), flush=True)
    elif proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(args)}")
    return wall


def client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{store}/mlflow.db")


def pipeline_runs(store: Path):
    """Parent runs, oldest first."""
    c = client(store)
    exp = c.get_experiment_by_name("bonsai")
    runs = c.search_runs([exp.experiment_id], "tags.`bonsai.role` = 'pipeline'", max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time)


def stage_runs(store: Path, parent_id: str):
    c = client(store)
    exp = c.get_experiment_by_name("bonsai")
    runs = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def duration(run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


class PrefectServer:
    """A `prefect server start` on a free loopback port, with its own PREFECT_HOME, for as long
    as the `with` block lasts; commands run inside get PREFECT_API_URL pointing at it."""

    def __enter__(self) -> str:
        import socket
        import tempfile
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "PREFECT_HOME": tempfile.mkdtemp(prefix="bonsai-prefect-"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The UI's JavaScript calls this URL; unset, it assumes port 4200.
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            self.proc.terminate()
            raise SystemExit("the Prefect server did not start within 120 s")
        os.environ["PREFECT_API_URL"] = self.url
        return self.url

    def __exit__(self, *exc) -> None:
        os.environ.pop("PREFECT_API_URL", None)
        self.proc.terminate()
        self.proc.wait(timeout=30)
