"""A fork server for the commands the tests run (`python -m flows.compress ...`, promote, replay,
serve, `mlflow gc`): one interpreter per test process imports the heavy libraries that read
nothing from the environment at import time (torch with its ONNX exporter and dynamo, onnx,
onnxscript, Hydra, scikit-learn), then forks a child per command, which runs the module as
`python -m` would: its own session, argv, environment, working directory and stdio files, its
exception or exit code as the exit status, and the interpreter's normal shutdown (threads joined,
atexit handlers run). On this project's 2-core machines a command spent 6-14 s importing those
libraries, more than its whole pipeline on the tests' tiny data; the suite runs about a hundred.
The server also exports one small model to ONNX before it serves: torch's first dynamo export in
a process costs 4 s more than the next ones (decomposition tables, fake-tensor and exporter
state built once), and most commands export.

A new SQLite MLflow store in a child starts as a copy of the first one MLflow migrated under
this server (tests/mlflow_template.py: 2.6 s of MLflow's migrations a store), and an export of a
model the test session exported already is a copy of that one (tests/export_cache.py).

Prefect's and MLflow's own dependencies are preloaded (pydantic, FastAPI, httpx, Alembic,
OpenTelemetry, ...: nothing there reads the environment when imported).

Prefect, MLflow and matplotlib are preloaded too (4-5 s of a command's imports on the 2-core
EPYC), after `flows` has set its environment defaults. Of what they read from the environment at
import, only Prefect's settings differ from command to command (its API URL above all): each
child sets its own environment, runs `flows`' defaults again and rebuilds Prefect's global
settings from them (`prefect.context.refresh_global_settings_context`, what Prefect itself calls
after its plugins change the environment). MLflow reads its variables when it uses them, and
Bonsai picks matplotlib's backend (Agg) itself. Not onnxruntime: its import starts a thread, and
a child forked after it hung in onnxruntime's exit handlers (a condition variable copied
mid-wait). Commands that a test kills, interrupts or races come from here too, through a
Popen-like handle (tests/helpers.py start_module); the server tests' Prefect workers (and the
flow runs they start) and the commands they restart a server, serve or start Dask under, the store
checks (they time a refusal as a user waits for it) and the first hour's whole image-folder run
start real fresh processes; `BONSAI_TEST_FORKSERVER=0` runs every command in a fresh
interpreter.

Protocol, one connection per command: the client sends one JSON line {module, args, env, cwd,
stdout, stderr} (stdout and stderr are file paths), the server answers "pid N" at once and
"exit CODE" when the child has ended (CODE as subprocess reports it: negative for a signal).
The server starts no thread of its own, so a fork never copies a lock another thread held
(OpenBLAS, which numpy starts, stops and restarts its pool around a fork).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
from pathlib import Path

PRELOAD = (
    "numpy",
    "torch",
    "torch._dynamo",
    "torch.export",
    "torch.onnx",
    "torch.onnx._internal.exporter._core",
    "torchvision",
    "onnx",
    "onnxscript",
    "sympy",
    "hydra",
    "omegaconf",
    "sklearn.datasets",
    "sqlalchemy",
    # Prefect's, MLflow's and matplotlib's dependencies (~2 s a command on the 2-core EPYC).
    "sqlalchemy.orm",
    "alembic",
    "pydantic",
    "pydantic_settings",
    "fastapi",
    "starlette",
    "httpx",
    "anyio",
    "h2",
    "websockets",
    "requests",
    "cryptography",
    "opentelemetry.sdk.trace",
    "google.protobuf",
    "griffe",
    "pendulum",
    "coolname",
    "humanize",
    "asgi_lifespan",
    "cachetools",
    "orjson",
    "sqlparse",
    "mako",
    "fsspec",
    "jsonschema",
    "prometheus_client",
    "pygments",
    "pathspec",
    "PIL.Image",
    "kiwisolver",
    "pyparsing",
    "cycler",
    "dateutil",
    # After `flows`, which sets the environment defaults they read (flows/__init__.py).
    "flows",
    "prefect",
    "prefect.flows",
    "prefect.tasks",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.client.orchestration",
    "prefect.results",
    "prefect.deployments",
    "mlflow",
    "mlflow.pyfunc",
    "mlflow.tracking",
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "matplotlib",
    "matplotlib.pyplot",
    # Bonsai's own layers and what they import only when a pipeline runs (GitPython: MLflow's
    # source-version tag; pydantic.v1: MLflow's model signature): ~0.5 s a command.
    "bonsai.build",
    "bonsai.stages",
    "bonsai.measure.evaluate",
    "bonsai.measure.compare",
    "tasks.stages",
    "tasks.tracking",
    "tasks.compare",
    "tasks.promote",
    "tasks.mlflow_backend",
    "flows.cli",
    "flows.compose",
    "git",
    "pydantic.v1",
)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # missing: the command imports what it needs
            importlib.import_module(name)
    _warm_exporter()
    _warm_mlflow_requirements()
    import threading

    if threading.active_count() != 1:  # a thread copied into a fork may hold a lock forever
        raise RuntimeError(f"the fork server would fork with threads: {threading.enumerate()}")


def _warm_mlflow_requirements() -> None:
    """MLflow maps every installed distribution to its modules (importlib_metadata's
    packages_distributions: 1.4 s of CPU on the 2-core EPYC) the first time a process logs a
    model, to check the model's pip requirements against this environment; nothing is installed
    while the tests run, so the children inherit one map instead of each building its own."""
    with contextlib.suppress(ImportError, AttributeError):  # a private function: only a warm-up
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def _warm_exporter() -> None:
    """One dynamo ONNX export of a small model, on one torch thread (no OpenMP pool to copy
    into the forks), without tqdm's monitor thread (torch.fx's interpreter opens a bar)."""
    import tempfile

    import torch
    import tqdm
    from torch import nn

    from bonsai.onnx_utils import export_onnx

    threads, interval = torch.get_num_threads(), tqdm.tqdm.monitor_interval
    torch.set_num_threads(1)
    tqdm.tqdm.monitor_interval = 0
    try:
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="bonsai-forkserver-warm-") as tmp:
            export_onnx(model, (1, 8, 8), Path(tmp) / "warm.onnx")
    finally:
        torch.set_num_threads(threads)
        tqdm.tqdm.monitor_interval = interval


def _serve(path: str) -> dict:
    """Accept commands until the client (our stdin) goes away. Returns, in a forked child, the
    request that child is to run; never returns in the server."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}
    try:
        while True:
            readable, _, _ = select.select([srv, sys.stdin], [], [], 0.05)
            if sys.stdin in readable and not sys.stdin.buffer.read1(1):
                break  # the test process ended
            if srv in readable:
                conn, _ = srv.accept()
                request = json.loads(conn.makefile("rb").readline())
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    srv.close()
                    conn.close()
                    for other in waiting.values():
                        other.close()
                    return request
                waiting[pid] = conn
                conn.sendall(f"pid {pid}\n".encode())
            while waiting:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = waiting.pop(pid, None)
                if conn is not None:
                    with contextlib.suppress(OSError):  # the client gave up (timeout)
                        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                    conn.close()
    finally:
        if os.getpid() == _SERVER_PID:
            for pid in waiting:  # commands still running when the tests end
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
    sys.exit(0)


def _become(request: dict) -> None:
    """In the forked child: turn into `python -m MODULE ARGS` started by subprocess.Popen."""
    os.setsid()  # its own process group, so a timeout kills what it started too
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(out, fd)
        os.close(out)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # what `python -m` puts first
    sys.argv = [request["module"], *request["args"]]
    # Preloaded with the server's environment: `flows`' defaults and Prefect's settings again,
    # from this command's.
    if "flows" in sys.modules:
        importlib.reload(sys.modules["flows"])
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


_SERVER_PID = os.getpid()

if __name__ == "__main__":
    from tests import export_cache, mlflow_template

    _preload()
    # After the warm-up export (it must really run): the children copy exports of models the
    # session exported already (tests/export_cache.py; the folder comes with each command's
    # environment).
    export_cache.install()
    # New SQLite stores start as a copy of the first one MLflow migrated (tests/mlflow_template.py),
    # kept beside the socket, in the folder the client removes.
    template = Path(sys.argv[1]).parent / "mlflow-template.db"
    req = _serve(sys.argv[1])
    _become(req)
    mlflow_template.install(template)
    import runpy

    del req, template
    runpy._run_module_as_main(sys.argv[0], alter_argv=True)  # exactly what `python -m` calls
