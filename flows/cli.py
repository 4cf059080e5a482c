"""The command line every Bonsai flow shares (compress, promote, compare, replay): Hydra
composes the config, bad overrides become one message and exit 2 before Hydra runs, Ctrl-C and
SIGTERM end open runs KILLED within seconds, a sweep runs every job and reports the failed ones,
and exit codes mean the same everywhere: 0 done, 1 the work failed (its run says why), 2 nothing
ran (fix the input), 128+signal interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (environment defaults, before prefect is imported)
from flows.compose import CONF_DIR, compose_checked, parse_overrides


@dataclass
class Outcome:
    """What a job returns when it has more than text to print: the objective of a search trial
    (flows/search.py), handed to Hydra's sweeper."""

    text: str
    objective: float | None = None


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every failed task and flow run with its traceback. A BonsaiError (a gate that
    failed, a full disk, a diverging loss) is a message for the user, not a bug: log it as one
    line. Anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from bonsai.errors import BonsaiError

        if record.exc_info and isinstance(record.exc_info[1], BonsaiError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForUserErrors())


def say(message: str) -> None:
    """One start-up line on stderr, in the form of the library's notes (`bonsai: ...`)."""
    print(f"bonsai: {message}", file=sys.stderr, flush=True)


def start_prefect_server() -> None:
    """Start the temporary Prefect server now, saying so and, once it answers, after how long.

    Prefect starts it silently at a flow's first API call; on a loaded 2-core machine the wait
    (a uvicorn process importing Prefect's server and migrating its database) was 10-40 s of a
    command's start-up with nothing on the screen but Prefect's own "Starting temporary server".
    Nothing to do when PREFECT_API_URL names a server, or when this process has started it
    already (a sweep's later jobs): it is the one instance Prefect's client uses."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return
    say(
        "starting a temporary Prefect server for this command (no PREFECT_API_URL; to skip "
        "this wait, keep one running: README, Sweeps and concurrency)"
    )
    t0 = time.perf_counter()
    server.start()
    say(f"the temporary Prefect server answered after {time.perf_counter() - t0:.1f} s")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _on_stop_signal(signum, _frame) -> None:
    """Ctrl-C (SIGINT) or SIGTERM: end this process's open MLflow runs as KILLED, stop the
    temporary Prefect server, exit 128 + signal (130, 143) within seconds.

    Python's default would raise KeyboardInterrupt in the main thread only, while the stage
    trains on in a worker thread; waiting for it could take minutes. The stage's artifact is
    still a `.tmp-` folder and its record is written only after it finished, so nothing partial
    is cached: the same command resumes from the last finished stage. SIGKILL cannot be caught:
    the next start marks such runs KILLED (tracking.reap_orphans).
    """
    name = signal.Signals(signum).name
    if "tasks.tracking" in sys.modules:  # runs can only be open once tracking is imported
        sys.modules["tasks.tracking"].kill_open_runs(f"interrupted by {name}")
    try:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    print(
        f"\nbonsai: interrupted by {name}: open runs ended KILLED, nothing partial was cached; "
        "run the same command again to resume from the last finished stage",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)


# How Prefect starts a temporary server (prefect.server.api.server.SubprocessASGIServer): its
# command line, and the variable it sets in the server's environment.
_TEMPORARY_SERVER_ARGS = ("uvicorn", "--factory", "prefect.server.api.server:create_app")
_TEMPORARY_SERVER_ENV = b"PREFECT__SERVER_EPHEMERAL=1"


def reap_orphan_servers() -> list[int]:
    """Stop the temporary Prefect servers that commands killed outright (SIGKILL, OOM) left
    running: an orphan (its parent is gone, so init adopted it) of this user, started by Prefect
    as a temporary server. Like the runs such a command left RUNNING, they are cleaned up by the
    next command; returns the pids stopped."""
    if os.getpid() == 1:  # in a container this process is init: every orphan is its own child
        return []
    stopped = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != 1:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not all(a.encode() in argv for a in _TEMPORARY_SERVER_ARGS):
                continue
            if _TEMPORARY_SERVER_ENV not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            os.kill(int(entry.name), signal.SIGTERM)
            stopped.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    if stopped:
        print(
            f"bonsai: stopped {len(stopped)} temporary Prefect server(s) left running by a "
            f"command that was killed (pid {', '.join(map(str, stopped))})",
            file=sys.stderr,
            flush=True,
        )
    return stopped


@contextlib.contextmanager
def stop_on_signals():
    """Install `_on_stop_signal` for SIGINT and SIGTERM while the block runs (main thread only).

    Installed for the whole command and again inside the flow: Prefect's engine swaps in its own
    handlers for a flow run, which would wait for the running stage to return before exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _split_cpus_between_parallel_jobs(raw: dict[str, Any], hydra_cfg) -> None:
    """Under a parallel launcher (joblib), give each job its share of the CPUs, so that
    jobs x torch threads never exceeds the cores. An explicit runtime.cpus wins."""
    from hydra.types import RunMode

    launcher = hydra_cfg.launcher
    if hydra_cfg.mode != RunMode.MULTIRUN or "joblib" not in str(launcher.get("_target_", "")):
        return
    if raw.get("runtime", {}).get("cpus") is not None:
        return
    cpus = len(os.sched_getaffinity(0))
    n_jobs = int(launcher.get("n_jobs") or -1)
    n_jobs = cpus if n_jobs <= 0 else n_jobs
    raw.setdefault("runtime", {})["cpus"] = max(1, cpus // n_jobs)


# Command-line flags of Hydra's own (help, config printing, ...): the command is then Hydra's.
_HYDRA_FLAGS = ("-m", "--multirun")


def check_overrides(args: list[str]) -> None:
    """Compose the config the command line asks for before Hydra runs it, so a bad override is
    one Bonsai message and exit 2 instead of Hydra's trace-style text and exit 1. A sweep is
    checked value by value."""
    parsed = parse_overrides(args, "cannot parse the command line")
    first: list[str] = []
    sweeps: list[tuple[int, str, list[str]]] = []
    for i, o in enumerate(parsed):
        if o.is_interval_sweep():  # a search space (Optuna): check its lower bound
            first.append(f"{o.get_key_element()}={o.value().start}")  # type: ignore[union-attr]
        elif o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            first.append(f"{o.get_key_element()}={values[0]}")
            sweeps.append((i, o.get_key_element(), values[1:]))
        else:
            first.append(o.input_line or "")
    # The first value of every swept key together, then each other value on its own.
    variants = [first] + [
        [*first[:i], f"{key}={v}", *first[i + 1 :]] for i, key, values in sweeps for v in values
    ]
    for overrides in variants[:200]:
        compose_checked(overrides)


def run_app(job: Callable[[dict[str, Any], list[str]], str | Outcome]) -> None:
    """Run `job(config, overrides) -> text to print` as a Hydra app with Bonsai's conventions.

    `job` raises ConfigError, DataError or StoreError when nothing could run (exit 2) and any
    other BonsaiError when the work failed (exit 1)."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from bonsai.errors import BonsaiError, ConfigError, DataError
    from bonsai.store import StoreError

    # The library's notes to the user (e.g. files the data loader skipped), one line each.
    notes = logging.getLogger("bonsai")
    if not notes.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bonsai: %(message)s"))
        notes.addHandler(handler)
        notes.setLevel(logging.INFO)
        notes.propagate = False

    quiet_user_errors()
    if not os.environ.get("PREFECT_API_URL"):  # this command starts a temporary server too
        reap_orphan_servers()
    args = sys.argv[1:]
    multirun = bool({"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(args))
    report_file = None
    if multirun:
        import tempfile

        # Each job (in this process or a launcher's worker) appends its outcome here.
        fd, report_file = tempfile.mkstemp(prefix="bonsai-sweep-", suffix=".jsonl")
        os.close(fd)
        os.environ["BONSAI_SWEEP_REPORT"] = report_file
    if not any(a.startswith("-") and a not in _HYDRA_FLAGS for a in args):
        try:
            check_overrides([a for a in args if a not in _HYDRA_FLAGS])
            if multirun:
                from flows.search import check_search

                check_search([a for a in args if a not in _HYDRA_FLAGS])
        except ConfigError as e:
            print(f"bonsai: error: {e}", file=sys.stderr)
            _fast_exit(2)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        raw: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[assignment]
        overrides = list(HydraConfig.get().overrides.task)
        _split_cpus_between_parallel_jobs(raw, HydraConfig.get())
        code, message = 0, ""
        value = None
        try:
            out = job(raw, overrides)
            if isinstance(out, Outcome):
                value = out.objective
            print(out.text if isinstance(out, Outcome) else out)
        except (ConfigError, DataError, StoreError) as e:  # nothing ran: fix it, run again
            code, message = 2, str(e)
        except BonsaiError as e:  # a stage failed; its run holds the details
            code, message = 1, str(e)
        except Exception as e:
            if not os.environ.get("BONSAI_SWEEP_REPORT"):
                raise
            import traceback

            traceback.print_exc()  # a bug in one job: the sweep still runs the others
            code, message = 1, f"{type(e).__name__}: {e}"
        if code:
            print(f"bonsai: error: {message}", file=sys.stderr)
        if path := os.environ.get("BONSAI_SWEEP_REPORT"):
            with open(path, "a") as f:  # one short line per job: appends do not interleave
                f.write(json.dumps({"overrides": overrides, "code": code, "error": message}) + "\n")
        elif code:
            sys.exit(code)
        return value  # a search trial's objective for the sweeper (None: not a search)

    code = 0
    try:
        with stop_on_signals():
            _main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if report_file is not None:
        code = max(code, _sweep_summary(Path(report_file)))
        Path(report_file).unlink(missing_ok=True)
        # A parallel launcher's worker processes are stopped by the interpreter's own shutdown
        # sequence (threads first, then exit handlers); leave it the normal way.
        sys.exit(code)
    _fast_exit(code)


def _sweep_summary(path: Path) -> int:
    """Print which sweep jobs failed; the exit code is the worst job's (0 when all finished)."""
    jobs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not jobs:  # Hydra refused the command line before any job
        return 0
    failed = [j for j in jobs if j["code"]]
    if not failed:
        print(f"bonsai: sweep finished: all {len(jobs)} job(s) succeeded")
        return 0
    print(f"bonsai: error: {len(failed)} of {len(jobs)} sweep job(s) failed:", file=sys.stderr)
    for j in failed:
        print(f"  {' '.join(j['overrides'])}: {j['error']}", file=sys.stderr)
    return max(j["code"] for j in failed)


def _fast_exit(code: int) -> None:
    """Run the exit handlers (Prefect stops its temporary server, MLflow flushes), flush the
    streams, then skip the interpreter's module teardown: with torch's compiler stack imported
    it takes 1-2 s, paid by every command for nothing."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
