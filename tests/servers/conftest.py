"""One set of real servers for the package's tests: PostgreSQL, the MLflow server on it, a Prefect
server. Started once, for the first server test, and stopped after the last one even when a test
fails (finalizers), each in its own process group. `make test` hands every file of this package
to one worker (tests/conftest.py pytest_xdist_make_scheduler), so the session starts one set.

Missing PostgreSQL: skipped on a developer machine (with the install command), an error in CI
(CI=true), where `.ci/run` installs it first: these tests never skip silently there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_module
from tests.servers.procs import (
    MlflowServer,
    Postgres,
    PrefectServer,
    mlflow_request,
    pg_bindir,
    start,
    stop_group,
)

# A pipeline that runs in seconds (the "tiny pipeline").
TINY = ["data=synthetic", "debug=fast", "teacher=cnn_large"]
STAGES = {"teacher", "student", "onnx", "int8"}


class Servers:
    def __init__(self, workdir: Path, pg: Postgres, mlflow: MlflowServer, prefect: PrefectServer):
        self.workdir = workdir
        self.pg = pg
        self.mlflow = mlflow
        self.prefect = prefect
        self.timings: dict[str, float] = {}

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a command pointed at these servers (tracking=server)."""
        env = {
            **os.environ,
            "PREFECT_API_URL": self.prefect.api,
            "MLFLOW_TRACKING_URI": self.mlflow.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.update(extra)
        return env

    def run(self, args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        """`python -m MODULE ARGS` (args[0] is "-m") pointed at these servers, to completion."""
        assert args[0] == "-m", args
        return run_module(args[1], args[2:], env=self.env(**env), timeout=timeout)

    def store(self) -> Path:
        """A fresh stage store (a test's own cache)."""
        return Path(tempfile.mkdtemp(prefix="store-", dir=self.workdir))

    # ---- MLflow, read through its REST API ------------------------------------------------
    def experiment_id(self, name: str) -> str:
        got = mlflow_request(
            self.mlflow.url,
            "GET",
            f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}",
        )
        return got["experiment"]["experiment_id"]

    def runs(self, experiment: str, filter: str = "") -> list[dict[str, Any]]:
        body = {"experiment_ids": [self.experiment_id(experiment)], "max_results": 1000}
        if filter:
            body["filter"] = filter
        return mlflow_request(self.mlflow.url, "POST", "/api/2.0/mlflow/runs/search", body).get(
            "runs", []
        )

    def logged_models(self, experiment: str) -> list[dict[str, Any]]:
        body = {"experiment_ids": [self.experiment_id(experiment)], "max_results": 1000}
        got = mlflow_request(self.mlflow.url, "POST", "/api/2.0/mlflow/logged-models/search", body)
        return got.get("models", [])

    def artifact(self, uri: str) -> bytes:
        """A file under an `mlflow-artifacts:/...` URI, downloaded through the server."""
        path = uri.removeprefix("mlflow-artifacts:/").lstrip("/")
        return mlflow_request(self.mlflow.url, "GET", f"/api/2.0/mlflow-artifacts/artifacts/{path}")

    # ---- Prefect --------------------------------------------------------------------------
    def start_worker(self, pool: str) -> subprocess.Popen:
        log = self.workdir / f"worker-{pool}-{uuid.uuid4().hex[:6]}.log"
        return start(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
            log,
            self.env(),
        )

    def trigger(self, deployment: str, parameters: dict[str, Any] | None = None) -> str:
        """Create a flow run of `flow/deployment` now, through the REST API (with these
        parameters, as anyone who may trigger it could send); its id."""
        flow, name = deployment.split("/")
        dep = self.prefect.request("GET", f"/deployments/name/{flow}/{name}")
        body = {"parameters": parameters} if parameters is not None else {}
        run = self.prefect.request("POST", f"/deployments/{dep['id']}/create_flow_run", body)
        return run["id"]

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.prefect.request("GET", f"/flow_runs/{run_id}")

    def wait_flow_run(
        self, run_id: str, timeout: float, states: tuple[str, ...] = ("COMPLETED",)
    ) -> dict[str, Any]:
        final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fr = self.flow_run(run_id)
            st = fr["state"]["type"] if fr.get("state") else None
            if st in states or st in final:
                return fr
            time.sleep(1.0)
        raise AssertionError(f"flow run {run_id} still {st} after {timeout} s")


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


@pytest.fixture(scope="package")  # stopped after the last server test (one worker runs them all)
def servers():
    bindir = pg_bindir()
    if bindir is None:
        msg = "PostgreSQL is not installed (apt-get install -y postgresql)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; .ci/run installs it before the tests", pytrace=False)
        pytest.skip(msg)
    workdir = Path(tempfile.mkdtemp(prefix="bonsai-servers-"))
    pg = Postgres(bindir)
    ml = MlflowServer(pg.uri(), workdir)
    pf = PrefectServer(workdir)
    try:
        t0 = time.monotonic()
        pg.start()
        t_pg = time.monotonic() - t0
        t_ml = ml.start()
        t_pf = pf.start()
        s = Servers(workdir, pg, ml, pf)
        s.timings = {"postgres": t_pg, "mlflow": t_ml, "prefect": t_pf}
        print(f"\nservers ready: postgres {t_pg:.1f} s, mlflow {t_ml:.1f} s, prefect {t_pf:.1f} s")
        yield s
    finally:
        for stop in (pf.stop, ml.stop, pg.stop):
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                print(f"stopping a server failed: {e}")
        if os.environ.get("BONSAI_KEEP_SERVER_LOGS"):
            print(f"server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def workers():
    """Start Prefect workers; every one is stopped at the end of the test."""
    started: list[subprocess.Popen] = []

    def _start(servers: Servers, pool: str) -> subprocess.Popen:
        proc = servers.start_worker(pool)
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        stop_group(proc)


tags = _tags
metrics = _metrics
