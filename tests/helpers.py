"""Small helpers shared by tests: run a stage into a store in a temp dir, drive the CLI."""

from __future__ import annotations

from pathlib import Path

from bonsai.artifacts import Artifact
from bonsai.build import run_stage as build_stage


def run_stage(
    kind, params, data, out: Path, *, input=None, teacher=None, seed=0, name=None, log=None
) -> Artifact:
    """Build one stage into the store at `out` (bonsai.build, without evaluation: the tests
    that measure call the evaluator themselves, so it is built every time); its artifact."""
    return build_stage(
        out, name or kind.replace(".", "_"), kind, params, data,
        input=input, teacher=teacher, seed=seed, evaluate=False,
        log=log or print,
    ).artifact  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Driving the command line in a subprocess (kill, resume and sweep tests)

ROOT = Path(__file__).resolve().parents[1]


def cli_env(temporary_server: bool = False) -> dict[str, str] | None:
    """The environment of a command a test runs: this process's (with the shared Prefect server
    of tests/conftest.py), or, with `temporary_server`, without PREFECT_API_URL, so that the
    command starts a temporary server of its own as it does on a user's first run."""
    import os

    if not temporary_server:
        return None
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def run_cli(
    store: Path,
    args: list[str],
    timeout: float = 600,
    env: dict | None = None,
    temporary_server: bool = False,
):
    """Run `python -m flows.compress ARGS tracking.store_dir=STORE` to completion (`env`: the
    environment, when not this process's)."""
    return run_module(
        "flows.compress",
        [*args, f"tracking.store_dir={store}"],
        timeout=timeout,
        env=env if env is not None else cli_env(temporary_server),
    )


def run_module(
    module: str,
    args: list[str],
    *,
    timeout: float = 600,
    env: dict | None = None,
    cwd: Path = ROOT,
):
    """`subprocess.run([python, "-m", module, *args], capture_output=True, text=True)`, started
    by this test process's fork server (tests/forkserver.py: the heavy libraries already
    imported), or as a fresh interpreter with BONSAI_TEST_FORKSERVER=0."""
    import os
    import subprocess
    import sys

    env = dict(os.environ if env is None else env)
    server = _fork_server()
    if server is None:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    return server.run(module, args, env=env, cwd=Path(cwd), timeout=timeout)


class ForkServer:
    """Client of tests/forkserver.py, one per test process."""

    def __init__(self) -> None:
        import os
        import subprocess
        import sys
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="bonsai-forkserver-"))
        self.socket = str(self.dir / "socket")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - open while it runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", self.socket],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
        )  # fmt: skip
        ready = self.proc.stdout.readline()
        if ready.strip() != b"ready":
            self.proc.kill()
            self.proc.wait()
            why = (self.dir / "server.log").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"the fork server did not start: {why}")

    def _request(self, module: str, args: list[str], env: dict, cwd: Path, out: Path, err: Path):
        """Send one command (the protocol in tests/forkserver.py): (connection, replies, pid)."""
        import json
        import socket

        request = {"module": module, "args": list(args), "env": env, "cwd": str(cwd),
                   "stdout": str(out), "stderr": str(err)}  # fmt: skip
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.socket)
        conn.sendall(json.dumps(request).encode() + b"\n")
        replies = conn.makefile("rb")
        return conn, replies, int(replies.readline().split()[1])

    def run(self, module: str, args: list[str], *, env: dict, cwd: Path, timeout: float):
        import os
        import signal
        import subprocess
        import sys
        import tempfile

        cmd = [sys.executable, "-m", module, *args]
        with tempfile.TemporaryDirectory(prefix="bonsai-cmd-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            conn, replies, pid = self._request(module, args, env, cwd, out, err)
            with conn:
                conn.settimeout(timeout)
                try:
                    line = replies.readline()
                except TimeoutError:
                    os.killpg(pid, signal.SIGKILL)  # the command and what it started
                    raise subprocess.TimeoutExpired(
                        cmd, timeout, output=_text(out), stderr=_text(err)
                    ) from None
            if not line.startswith(b"exit "):
                raise RuntimeError(f"the fork server lost the command {cmd}: {line!r}")
            code = int(line.split()[1])
            return subprocess.CompletedProcess(cmd, code, _text(out), _text(err))

    def start(self, module: str, args: list[str], *, env: dict, cwd: Path) -> ForkedCommand:
        """The command started (its stdout and stderr into one file), not waited for."""
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="bonsai-cmd-", dir=self.dir)) / "output"
        out.touch()
        conn, replies, pid = self._request(module, args, env, cwd, out, out)
        return ForkedCommand(pid, conn, replies, out)

    def stop(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.stdin.close()  # the server sees EOF, kills what still runs and exits
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ForkedCommand:
    """What subprocess.Popen(..., stdout=PIPE, stderr=STDOUT, text=True, start_new_session=True)
    gives, for a command the fork server started: `pid` (a session and process group of its
    own), `poll`, `wait`, `communicate`, `send_signal`, `kill`, `terminate`, `returncode`, and
    `stdout`, the output file open for reading."""

    def __init__(self, pid: int, conn, replies, output: Path) -> None:  # type: ignore[no-untyped-def]
        self.pid = pid
        self.args = [str(pid)]
        self.returncode: int | None = None
        self._conn, self._replies = conn, replies
        self.stdout = open(output, errors="replace")  # noqa: SIM115 - closed when it ends

    def _read_exit(self, timeout: float | None) -> None:
        import select

        if self.returncode is not None:
            return
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return
        line = self._replies.readline()
        if not line.startswith(b"exit "):
            raise RuntimeError(f"the fork server lost the command {self.pid}: {line!r}")
        self.returncode = int(line.split()[1])
        self._replies.close()
        self._conn.close()

    def poll(self) -> int | None:
        self._read_exit(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        self._read_exit(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        self.wait(timeout)
        out = self.stdout.read()
        self.stdout.close()
        return out, None

    def send_signal(self, sig: int) -> None:
        import os

        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)


def _text(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


_SERVER: list = []  # [ForkServer] once started, [None] when off


def _fork_server() -> ForkServer | None:
    import atexit
    import os

    if not _SERVER:
        if os.environ.get("BONSAI_TEST_FORKSERVER", "1") == "0":
            _SERVER.append(None)
        else:
            server = ForkServer()
            atexit.register(server.stop)
            _SERVER.append(server)
    return _SERVER[0]


def start_cli(store: Path, args: list[str], temporary_server: bool = False):
    """`python -m flows.compress ARGS tracking.store_dir=STORE` started, not waited for."""
    return start_module(
        "flows.compress", [*args, f"tracking.store_dir={store}"], env=cli_env(temporary_server)
    )


def start_module(module: str, args: list[str], *, env: dict | None = None, cwd: Path = ROOT):
    """`python -m MODULE ARGS` started, not waited for: what subprocess.Popen(stdout=PIPE,
    stderr=STDOUT, text=True, start_new_session=True) gives, from this test process's fork server
    (ForkedCommand: the same pid, process group, signals and exit status; `stdout` a file to
    read), or a subprocess.Popen with BONSAI_TEST_FORKSERVER=0."""
    import os
    import subprocess
    import sys

    env = dict(os.environ if env is None else env)
    server = _fork_server()
    if server is not None:
        return server.start(module, args, env=env, cwd=Path(cwd))
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a test can clean up after SIGKILL
        env=env,
    )


def stage_run_exists(store: Path, stage: str) -> bool:
    """Read-only look at the store: an MlflowClient here could run migrations on a DB the flow
    process is still creating, and two processes migrating one new DB corrupt it."""
    import sqlite3

    db = store / "mlflow.db"
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute(
                "SELECT 1 FROM tags WHERE key = 'bonsai.stage' AND value = ?", (stage,)
            ).fetchall()
        return bool(rows)
    except sqlite3.Error:  # tables not created yet
        return False


def wait_inside_stage(proc, store: Path, stage: str, timeout: float = 150.0, settle: float = 2.0):
    """Block until `stage` is running in `proc` (its run exists and it is writing its artifact)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if stage_run_exists(store, stage) and list((store / "stages").glob(f".tmp-{stage}-*")):
            time.sleep(settle)
            return
        time.sleep(0.2)
    raise AssertionError(f"stage {stage!r} never started")


def store_runs(store: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("bonsai")
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


# ---------------------------------------------------------------------------------------------
# Reloading artifacts in a fresh interpreter (nothing cached in memory, no pickle anywhere)

_RELOAD = """
import sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from bonsai.artifacts import load_torch, open_artifact
x = torch.from_numpy(np.load(sys.argv[2]))
out = {}
for i, path in enumerate(sys.argv[4:]):
    with torch.no_grad():
        out[str(i)] = load_torch(open_artifact(path))(x).numpy()
np.savez(sys.argv[3], **out)
"""


def logits_in_fresh_process(paths: list[Path], x, tmp: Path) -> list:
    """Open (checksums verified) and load each torch artifact in a new Python process, and
    return its logits for `x` [N, C, H, W], computed there with this process's thread count."""
    import subprocess
    import sys

    import numpy as np
    import torch

    np.save(tmp / "x.npy", x.numpy())
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _RELOAD,
            str(torch.get_num_threads()),
            str(tmp / "x.npy"),
            str(tmp / "out.npz"),
            *map(str, paths),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp / "out.npz") as f:
        return [f[str(i)] for i in range(len(paths))]
