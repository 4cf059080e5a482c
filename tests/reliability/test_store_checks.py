"""A store or tracking server that cannot be used is refused before any work: one message that
names the problem and the fix, exit 2, within seconds (not 30-40 s of raw tracebacks)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

FAST = ["data=synthetic", "debug=fast", "teacher=cnn_large"]


def cli(*args, timeout=60):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.compress", *FAST, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - t0


def assert_refused(proc, seconds, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bonsai: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])
    assert seconds < 30, seconds


@pytest.fixture
def made_store(tmp_path):
    """A store with a database, as the first command leaves it."""
    from tasks.mlflow_backend import init_store

    store = tmp_path / "mlruns"
    init_store(None, str(store), "bonsai")
    return store


def test_a_store_path_that_is_a_file(tmp_path):
    path = tmp_path / "mlruns"
    path.write_text("not a folder")
    proc, secs = cli(f"tracking.store_dir={path}")
    assert_refused(proc, secs, "is a file, not a folder", "tracking.store_dir")


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_damaged_database(made_store, damage):
    db = made_store / "mlflow.db"
    data = bytearray(db.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 3]
    else:
        for i in range(0, len(data), 997):
            data[i] ^= 0x5A
    db.write_bytes(bytes(data))
    before = db.read_bytes()
    proc, secs = cli(f"tracking.store_dir={made_store}")
    assert_refused(proc, secs, str(db), f"mv {db} {db}.bad")
    assert db.read_bytes() == before  # refused, not "repaired" behind the user's back
    assert not list((made_store).glob("stages/*")), "no work started"


def test_a_read_only_store(made_store, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(made_store), str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        proc, secs = cli(f"tracking.store_dir={ro}")
        assert_refused(proc, secs, "is not writable", "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_a_tracking_server_that_does_not_answer(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env_before = dict(os.environ)
    proc, secs = cli(f"tracking.uri={url}", f"tracking.store_dir={tmp_path / 'mlruns'}")
    assert os.environ == env_before
    assert_refused(proc, secs, url, "does not answer", "mlflow server")
    assert not (tmp_path / "mlruns").exists()
