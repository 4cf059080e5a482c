"""The disk fills in the middle of a run (here: while the teacher is evaluated, on a small tmpfs
holding the store): one message naming the full disk, the runs end FAILED, nothing half-written
is left for a later run to trust, and after space is freed the same command finishes."""

import subprocess

import pytest

from tests.helpers import run_module, store_runs

pytestmark = pytest.mark.slow
ARGS = ["data=synthetic", "debug=fast", "teacher=cnn_large", "runtime.progress=false"]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs: room for the database (~1 MB) and the teacher's 4.5 MB weights, not for
    its 4.5 MB ONNX export that the evaluator times."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def cli(store):
    return run_module(
        "flows.compress",
        [*ARGS, f"tracking.store_dir={store}"],
        timeout=600,
    )


def test_full_disk_fails_with_one_message_and_nothing_half_written(small_disk):
    store = small_disk / "mlruns"
    proc = cli(store)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bonsai: error:")]
    assert len(errors) == 1 and "no space left on the disk" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in out, out[-4000:]
    assert len(out.splitlines()) < 40, out  # not thousands of retry lines

    statuses = {
        r.data.tags.get("bonsai.stage", "pipeline"): r.info.status for r in store_runs(store)
    }
    assert statuses == {"pipeline": "FAILED", "teacher": "FAILED"}
    assert not list((store / "records").glob("teacher-*")), "a half-evaluated stage was recorded"
    empty = [p for p in store.rglob("*") if p.is_file() and p.stat().st_size == 0]
    assert [p.name for p in empty if not p.name.endswith(".lock")] == []
    assert not list(store.rglob(".tmp-*")), "temporary files left behind"

    # Free space (a bigger disk), run the same command: it finishes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = cli(store)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
