"""Stage tasks on a Dask cluster (`runtime.task_runner=dask`), through prefect-dask's task runner.

    runtime.dask_address: null          -> a local cluster: `workers` worker processes, 1 task each
    runtime.dask_address: tcp://h:8786  -> an existing cluster's scheduler

Each worker process runs one stage at a time (one Dask thread) with `threads` torch threads, so
workers x threads never exceeds the cores (`flows.compress._threads`, the same rule as the
thread-pool runner). A worker plugin sets up every worker that joins, local or remote, before it
runs a stage: torch's thread count (process-wide, measured on the 2-core reference machine), the MLflow tracking URI (a stage's
child run is created in the worker process) and Bonsai's environment defaults.

What a remote worker needs: Bonsai installed (same version), the store (`tracking.store_dir`) at
the same path on storage every worker mounts (stage artifacts and cache records are read and
written there; per-key locks are flock locks, which NFSv4 honours), the MLflow server and the
Prefect API reachable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner


class BonsaiWorkerSetup(WorkerPlugin):
    """Runs in every Dask worker process before its first task."""

    name = "bonsai-worker-setup"

    def __init__(self, threads: int, tracking_uri: str, env: dict[str, str]):
        self.threads = threads
        self.tracking_uri = tracking_uri
        self.env = env

    def setup(self, worker: Any) -> None:
        for k, v in self.env.items():
            os.environ.setdefault(k, v)
        import mlflow
        import torch

        torch.set_num_threads(self.threads)
        mlflow.set_tracking_uri(self.tracking_uri)


class BonsaiDaskRunner(DaskTaskRunner):
    """DaskTaskRunner that installs `BonsaiWorkerSetup` on the cluster it connects to."""

    def __init__(self, *args: Any, setup: BonsaiWorkerSetup, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.setup = setup

    @property
    def client(self) -> Any:
        new = self._client is None
        client = DaskTaskRunner.client.fget(self)  # type: ignore[attr-defined]
        if new:
            client.register_plugin(self.setup)
        return client

    def duplicate(self) -> BonsaiDaskRunner:
        return type(self)(
            address=self.address,
            cluster_class=self.cluster_class,
            cluster_kwargs=self.cluster_kwargs,
            adapt_kwargs=self.adapt_kwargs,
            client_kwargs=self.client_kwargs,
            performance_report_path=self.performance_report_path,
            setup=self.setup,
        )


# Settings a worker process must share with the flow's process: which Prefect API records the
# task runs (unset: the flow's temporary server is not reachable from a remote worker) and
# MLflow's pickle refusal.
_SHARED_ENV = ("PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION")


def dask_task_runner(
    address: str | None, workers: int, threads: int, tracking_uri: str
) -> BonsaiDaskRunner:
    """A task runner on the cluster at `address`, or on a new local cluster of `workers`
    processes (one task each) when `address` is None."""
    env = {k: os.environ[k] for k in _SHARED_ENV if k in os.environ}
    setup = BonsaiWorkerSetup(threads, tracking_uri, env)
    if address:
        probe_scheduler(address)
        return BonsaiDaskRunner(address=address, setup=setup)
    return BonsaiDaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,  # one stage per worker process at a time
            "processes": True,
            "dashboard_address": None,  # no web server (and no port) per command
            # A stage holds a model, its data and an onnxruntime session: no spilling.
            "memory_limit": 0,
        },
        setup=setup,
    )


@contextlib.contextmanager
def prefect_api_for_workers() -> Iterator[None]:
    """Make the flow's Prefect API one that Dask worker processes reach too.

    Without PREFECT_API_URL, Prefect starts a temporary server per process: every worker process
    would start its own (~20 s each) and record its task runs where the flow never looks. So
    start this process's temporary server first and name it in the settings the task runner
    sends along with each task."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses (stopped at exit)
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def probe_scheduler(address: str, timeout: float = 10.0) -> None:
    """Refuse, before the flow starts, a Dask scheduler that does not accept connections (Dask's
    client would wait its own timeout, then fail the flow run with a stack trace)."""
    import socket

    from bonsai.store import StoreError

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
    raise StoreError(
        f"runtime.dask_address: the Dask scheduler at {address} does not answer ({why}); start "
        f"it (`dask scheduler --port {port or 8786}`, then `dask worker {address} --nthreads 1` "
        "on each machine), or set runtime.dask_address=null for a local cluster"
    )
