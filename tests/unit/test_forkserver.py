"""The tests' fork server (tests/forkserver.py) must run a command as a fresh `python -m` would:
same argv, __main__, sys.path, cwd, environment, output, exit status, shutdown, and a timeout
that leaves nothing running. Each case runs a probe module both ways and compares. (Checked to
fail: with `sys.path[0] = cwd` or the env update removed from tests/forkserver.py, or
os.setsid there, the comparison or the timeout test fails.)"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import ForkServer, _fork_server, run_module

PROBE = """
import atexit, json, os, sys, threading, time

out = os.environ["PROBE_OUT"]
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
def late():
    time.sleep(0.5)
    open(out + ".thread", "w").write("joined")
threading.Thread(target=late).start()  # not a daemon: shutdown waits for it

import __main__
json.dump({
    "argv": sys.argv, "name": __name__, "main_spec": __main__.__spec__.name,
    "path0": sys.path[0], "cwd": os.getcwd(), "var": os.environ.get("PROBE_VAR"),
    "leaked": os.environ.get("PROBE_ONLY_IN_TEST_PROCESS"), "pgid_is_pid": os.getpgid(0) == os.getpid(),
}, open(out, "w"))
print("to stdout")
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "raise":
    raise ValueError("boom")
if mode == "kill":
    os.kill(os.getpid(), 9)
if mode == "hang":
    import subprocess
    child = subprocess.Popen(["sleep", "300"])
    open(out + ".child", "w").write(str(child.pid))
    time.sleep(300)
sys.exit(int(mode))
"""


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    (tmp_path / "bonsai_probe.py").write_text(PROBE)
    return tmp_path


def _run(probe: Path, mode: str, fresh: bool, timeout: float = 120):
    out = probe / ("fresh" if fresh else "forked") / mode
    out.parent.mkdir(exist_ok=True)
    env = {**os.environ, "PROBE_OUT": str(out), "PROBE_VAR": "set for the command"}
    env.pop("PROBE_ONLY_IN_TEST_PROCESS", None)
    if fresh:
        import sys

        proc = subprocess.run(
            [sys.executable, "-m", "bonsai_probe", mode],
            cwd=probe, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    else:
        proc = run_module("bonsai_probe", [mode], env=env, cwd=probe, timeout=timeout)
    seen = json.loads(out.read_text()) if out.exists() else None
    return proc, seen, out


@pytest.fixture(autouse=True)
def _server(monkeypatch):
    if _fork_server() is None:
        pytest.skip("BONSAI_TEST_FORKSERVER=0: every command is a fresh interpreter already")
    # Something only the test process has: a command must not see it when given another env.
    monkeypatch.setenv("PROBE_ONLY_IN_TEST_PROCESS", "1")


@pytest.mark.parametrize("mode", ["0", "3", "raise", "kill"])
def test_a_forked_command_is_what_a_fresh_interpreter_is(probe, mode):
    fresh, fresh_seen, fresh_out = _run(probe, mode, fresh=True)
    forked, forked_seen, forked_out = _run(probe, mode, fresh=False)
    assert forked.returncode == fresh.returncode == {"0": 0, "3": 3, "raise": 1, "kill": -9}[mode]
    # One difference, on purpose: the forked command leads its own process group (a timeout
    # kills what it started too), which subprocess.run without start_new_session does not give.
    assert forked_seen.pop("pgid_is_pid") and not fresh_seen.pop("pgid_is_pid")
    assert forked_seen == fresh_seen
    assert forked_seen["name"] == "__main__" and forked_seen["main_spec"] == "bonsai_probe"
    assert forked_seen["var"] == "set for the command" and forked_seen["leaked"] is None
    assert forked.stdout == fresh.stdout
    assert "to stderr" in forked.stderr
    if mode == "raise":
        assert "ValueError: boom" in forked.stderr and "ValueError: boom" in fresh.stderr
    if mode != "kill":  # a SIGKILL skips shutdown, in both
        for suffix in (".atexit", ".thread"):
            assert Path(str(forked_out) + suffix).exists(), suffix
            assert Path(str(fresh_out) + suffix).exists(), suffix


def test_a_timeout_kills_the_command_and_what_it_started(probe):
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        _run(probe, "hang", fresh=False, timeout=15)
    assert time.monotonic() - t0 < 60
    assert "to stdout" in (info.value.output or "") or "to stderr" in (info.value.stderr or "")
    out = probe / "forked" / "hang"
    [seen] = [json.loads(out.read_text())]
    assert seen["pgid_is_pid"]  # its own process group, as start_new_session gives
    grandchild = int(Path(str(out) + ".child").read_text())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the command's child {grandchild} still runs after the timeout")


def test_a_server_that_cannot_start_says_why(monkeypatch, tmp_path):
    """A broken environment is an error naming the server's log, not a hang."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    (tmp_path / "tests" / "forkserver.py").write_text("raise SystemExit('no server here')\n")
    monkeypatch.setattr("tests.helpers.ROOT", tmp_path)
    with pytest.raises(RuntimeError, match="no server here"):
        ForkServer()
