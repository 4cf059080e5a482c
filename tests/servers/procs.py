"""Real server processes for the integration tests: PostgreSQL in a temp dir on a free port, the
MLflow server on it (artifacts served through it), a Prefect server, and Prefect workers.

Each runs in its own process group, so stopping it stops its children (uvicorn workers, the flow
runs a worker started). Everything is bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "bonsai-test-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path | None:
    """PostgreSQL's server binaries (Debian keeps them out of PATH)."""
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True)
        d = Path(out.stdout.strip())
        if (d / "initdb").exists():
            return d
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists():
            return Path(d)
    return None


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{url} not ready after {timeout} s ({last}):\n{tail}")


def stop_group(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `grace` seconds."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group
    )


class Postgres:
    """A throw-away PostgreSQL cluster: initdb in a temp dir, password auth, one database."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bonsai-pg-"))
        self.data = self.dir / "data"
        self.user = "bonsai"
        # initdb refuses to run as root: run the server as the `postgres` user then.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self.started = False

    def _run(self, *args: str) -> None:
        out = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"{args[0]} failed: {out.stdout}{out.stderr}")

    def start(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres")
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
            "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
        )  # fmt: skip
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
            "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir}", "-w", "-t", "60", "start",
        )  # fmt: skip
        self.started = True
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.user, "mlflow"],
            check=True, env=env, capture_output=True, timeout=60,
        )  # fmt: skip

    def uri(self, db: str = "mlflow", password: str = PASSWORD) -> str:
        return f"postgresql+psycopg://{self.user}:{password}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
                )
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """`python -m flows.mlflow_server` (the README's command) on the PostgreSQL backend, with
    artifacts uploaded through the server into a temp dir."""

    def __init__(self, backend_uri: str, workdir: Path):
        self.backend_uri = backend_uri
        self.port = free_port()
        self.artifacts = workdir / "mlartifacts"
        self.log = workdir / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> float:
        t0 = time.monotonic()
        self.proc = start(
            [sys.executable, "-m", "flows.mlflow_server",
             "--backend-store-uri", self.backend_uri,
             "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2"],
            self.log,
        )  # fmt: skip
        wait_http(f"{self.url}/health", timeout, self.proc, self.log)
        return time.monotonic() - t0

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None


# A file (tests/conftest.py names it for the session): the first Prefect server's database right
# after it started, a copy of which every later server starts from. Prefect migrates a new
# SQLite database at start-up (Alembic, ~100 migrations): 15.5 s of CPU and of wall time before
# a server answered on the 2-core EPYC, 7.7 s from a migrated copy. The copy is taken before any
# test used that server: it holds Prefect's schema and what Prefect registers at start-up.
PREFECT_TEMPLATE = "BONSAI_TEST_PREFECT_TEMPLATE"


def _sqlite_copy(src: Path, dst: Path) -> None:
    """A consistent copy of an SQLite database another process may be writing (backup API)."""
    a = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    b = sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        b.close()
        a.close()


class PrefectServer:
    def __init__(self, workdir: Path, persist_events: bool = True):
        """`persist_events=False`: the server keeps no event history (its event persister off;
        task runs, states, logs and automations work as before): the per-test-process servers
        of tests/conftest.py, whose events no test reads. Measured on the 2-core EPYC, a flow
        run of 8 tasks cost such a server 0.50 s of CPU instead of 0.72 s, and it idles at
        1.7 s a minute instead of 2.3."""
        self.persist_events = persist_events
        self.port = free_port()
        self.home = workdir / "prefect-home"
        self.log = workdir / "prefect-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 180) -> float:
        t0 = time.monotonic()
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        if not self.persist_events:
            env["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"] = "false"
        env.pop("PREFECT_API_URL", None)
        template = os.environ.get(PREFECT_TEMPLATE)
        db = self.home / "prefect.db"
        if template and Path(template).is_file() and not db.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            _sqlite_copy(Path(template), db)
        self.proc = start(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port)],
            self.log,
            env,
        )  # fmt: skip
        wait_http(f"{self.api}/health", timeout, self.proc, self.log)
        if template and not Path(template).exists() and db.is_file():
            with contextlib.suppress(OSError, sqlite3.Error):  # no template: the next one migrates
                part = Path(template).with_name(f".{os.getpid()}.part")
                _sqlite_copy(db, part)
                os.replace(part, template)
        return time.monotonic() - t0

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None

    # The REST API, read by hand (no Prefect client settings in the test process). A 503 is the
    # server's SQLite database busy under a burst of writes (a worker starting flow runs while
    # a test creates more): tried again for up to 30 s, as Prefect's own client does.
    def request(self, method: str, path: str, body: Any = None) -> Any:
        import urllib.error

        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + 30
        while True:
            req = urllib.request.Request(
                self.api + path, data=data, method=method,
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                if e.code != 503 or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)


def mlflow_request(base: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw[:1] in (b"{", b"[") else raw
