"""Bad input for scheduled and served runs: a cron string that does not parse, deployment
overrides that are not valid Hydra overrides, a Prefect API or PostgreSQL that does not answer.
Each is one message and exit 2, before anything is registered or created."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_module

ROOT = Path(__file__).resolve().parents[2]


def _dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (args[0] is "-m") with these extra environment variables."""
    assert args[0] == "-m", args
    return run_module(args[1], args[2:], env={**os.environ, **env}, timeout=90)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--cron", "61 * * * *"], ["invalid cron schedule '61 * * * *'", "five fields"]),
        (["--cron", "0 2 * *"], ["invalid cron schedule '0 2 * *'"]),
        (["--cron", "0 2 * * *", "--timezone", "Mars/Olympus"], ["timezone 'Mars/Olympus'"]),
        (["--", "teacher=nope"], ["unknown config option 'teacher/nope'", "resnet18"]),
        (["--", "pipeline.stages.teacher.epochz=3"], ["epochz is not a key"]),
        (["--", "pipeline.stages.teacher.epochs=0"], ["pipeline.stages.teacher.epochs", "(got 0)"]),
        (["--", "seed=1,2"], ["is a sweep", "one deployment per value"]),
        (["--", "seed=[1"], ["invalid override"]),
        (["--flow", "promote", "--", "data=synthetic"], ["needs a policy", "promote=edge_small"]),
    ],
    ids=["cron-range", "cron-fields", "timezone", "unknown-option", "unknown-key", "bad-value",
         "sweep", "unparsable", "promote-without-policy"],
)  # fmt: skip
def test_a_bad_deployment_is_refused_before_the_server_is_contacted(
    args, expected, capsys, monkeypatch
):
    # In-process (the command line's exit status is checked once below). No Prefect server
    # (not the one the suite's commands share): the message is about the deployment, so it was
    # checked first, and nothing could have been registered.
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from flows.serve import main

    assert main(["--pool", "p", "--name", "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bonsai: error: deployment 'x'"), err
    for e in expected:
        assert e in err


def test_the_command_line_exits_2_on_a_bad_cron_string():
    out = _run(["-m", "flows.serve", "--pool", "p", "--name", "x", "--cron", "61 * * * *"],
               PREFECT_API_URL=_dead_url())  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("bonsai: error: deployment 'x': invalid cron schedule")
    assert "Traceback" not in out.stderr


def test_a_bad_prefect_yaml_registers_nothing(tmp_path, capsys):
    good = {"name": "ok", "cron": "0 2 * * *"}
    bad = {"name": "broken", "cron": "every night"}
    text = "deployments:\n" + "".join(
        f"  - name: {d['name']}\n    entrypoint: flows/deployed.py:compress_overrides\n"
        f"    parameters: {{overrides: [data=synthetic]}}\n"
        f"    schedules: [{{cron: '{d['cron']}'}}]\n"
        for d in (good, bad)
    )
    f = tmp_path / "prefect.yaml"
    f.write_text(text)
    from flows.serve import main

    assert main(["--pool", "p", "--file", str(f)]) == 2
    assert "deployment 'broken': invalid cron schedule 'every night'" in capsys.readouterr().err


def test_the_projects_prefect_yaml_is_valid():
    """Every deployment in prefect.yaml composes and validates, and its cron strings parse."""
    from flows.serve import PREFECT_YAML, check_deployment, load_prefect_yaml

    deployments = load_prefect_yaml(PREFECT_YAML)
    assert {d.flow for d in deployments} == {"compress", "promote"}
    for d in deployments:
        assert d.crons, d.name
        check_deployment(d)


def test_serving_needs_a_prefect_server():
    out = _run(["-m", "flows.serve", "--name", "x"], PREFECT_API_URL="")
    assert out.returncode == 2
    assert "prefect server start" in out.stderr and "PREFECT_API_URL" in out.stderr


def test_a_prefect_api_that_does_not_answer_is_refused_before_any_work(tmp_path):
    url = _dead_url()
    store = tmp_path / "mlruns"
    out = _run(
        ["-m", "flows.compress", "data=synthetic", "debug=fast", f"tracking.store_dir={store}"],
        PREFECT_API_URL=url,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"the Prefect API at {url}" in out.stderr
    assert "prefect server start --host 127.0.0.1" in out.stderr
    assert "Traceback" not in out.stderr
    assert not store.exists()  # nothing created


def test_a_postgresql_uri_without_a_driver_is_refused(tmp_path):
    store = tmp_path / "mlruns"
    out = _run(
        ["-m", "flows.compress", "data=synthetic", "debug=fast", f"tracking.store_dir={store}",
         "tracking.uri=postgresql://bonsai:secret@127.0.0.1:5432/mlflow"],
    )  # fmt: skip
    assert out.returncode == 2
    assert "postgresql+psycopg://" in out.stderr
    assert "secret" not in out.stderr  # passwords are never printed
    assert not store.exists()


def test_a_postgresql_that_is_down_is_refused(tmp_path):
    store = tmp_path / "mlruns"
    port = _dead_url().split(":")[2].split("/")[0]
    out = _run(
        ["-m", "flows.compress", "data=synthetic", "debug=fast", f"tracking.store_dir={store}",
         f"tracking.uri=postgresql+psycopg://bonsai:secret@127.0.0.1:{port}/mlflow"],
    )  # fmt: skip
    assert out.returncode == 2
    assert "cannot use the PostgreSQL store" in out.stderr and "start PostgreSQL" in out.stderr
    assert "secret" not in out.stderr
    assert not store.exists()


def test_a_dask_address_that_is_not_an_address_is_refused():
    from bonsai.config import validate_config
    from bonsai.errors import ConfigError
    from flows.compress import apply_caps, compose_config

    raw = compose_config(["runtime.task_runner=dask", "runtime.dask_address=localhost:8786"])
    with pytest.raises(ConfigError, match=r"runtime.dask_address.*localhost:8786"):
        validate_config(apply_caps(raw))
    raw = compose_config(["runtime.task_runner=spark"])
    with pytest.raises(ConfigError, match=r"runtime.task_runner.*'threads' or 'dask'"):
        validate_config(apply_caps(raw))


def test_a_dask_scheduler_that_does_not_answer_is_refused_before_the_flow(tmp_path):
    store = tmp_path / "mlruns"
    port = _dead_url().split(":")[2].split("/")[0]
    out = _run(
        ["-m", "flows.compress", "data=synthetic", "debug=fast", f"tracking.store_dir={store}",
         "runtime.task_runner=dask", f"runtime.dask_address=tcp://127.0.0.1:{port}"],
        PREFECT_API_URL="",
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"the Dask scheduler at tcp://127.0.0.1:{port} does not answer" in out.stderr
    assert "Traceback" not in out.stderr
    assert not store.exists()  # no store, no run
