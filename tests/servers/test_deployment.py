"""A deployment on the real Prefect server, run by a real worker, tracked on the real MLflow server
(PostgreSQL backend, artifacts uploaded through the server), read back through MLflow's REST API.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import onnxruntime as ort
import pytest

from flows.deployed import DEFAULT_ALLOW
from tests.servers.conftest import STAGES, TINY, metrics, tags

pytestmark = [pytest.mark.slow, pytest.mark.servers]


@pytest.fixture(scope="module")
def tiny_store(servers):
    """One stage store for this module: the second test reuses the first one's builds."""
    return servers.store()


def test_a_deployed_run_goes_through_a_worker_and_is_tracked_on_the_server(
    servers, workers, tiny_store
):
    exp = f"deploy-{uuid.uuid4().hex[:8]}"
    store = tiny_store
    overrides = [
        *TINY,
        "tracking=server",
        f"tracking.store_dir={store}",
        f"tracking.experiment={exp}",
        # The owner's own network, from a package the owner allowed (README: Security).
        "teacher=custom",
        "teacher._target_=tests.nets.ResidualDepthwiseSE",
        "models.allowed_modules=[torchvision.models,bonsai,tests]",
    ]
    pool = f"pool-{uuid.uuid4().hex[:6]}"

    t0 = time.monotonic()
    reg = servers.run(
        ["-m", "flows.serve", "--pool", pool, "--name", "tiny", "--cron", "0 3 * * *", "--", *overrides],
        timeout=120,
    )  # fmt: skip
    t_register = time.monotonic() - t0
    assert reg.returncode == 0, reg.stdout + reg.stderr
    assert "registered bonsai-compress/tiny" in reg.stdout
    # The schedule is on the server: the deployment has its cron, and its next runs are planned.
    dep = servers.prefect.request("GET", "/deployments/name/bonsai-compress/tiny")
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
    assert dep["parameters"] == {"overrides": overrides, "allow": list(DEFAULT_ALLOW)}
    assert dep["work_pool_name"] == pool

    workers(servers, pool)
    t0 = time.monotonic()
    run_id = servers.trigger("bonsai-compress/tiny")
    fr = servers.wait_flow_run(run_id, timeout=420)
    t_run = time.monotonic() - t0
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    print(f"\nregistration {t_register:.1f} s; triggered run to COMPLETED {t_run:.1f} s")

    # MLflow, read through the server's REST API.
    parents = servers.runs(exp, "tags.`bonsai.role` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED"
    children = servers.runs(exp, f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")
    assert {tags(c)["bonsai.stage"] for c in children} == STAGES
    assert len(children) == len(STAGES)
    from bonsai.data import load_data
    from flows.compose import compose_config

    n_test = len(load_data(compose_config(TINY)["data"]).test_y)
    for c in children:
        assert c["info"]["status"] == "FINISHED"
        m = metrics(c)
        assert {"accuracy", "bytes", "params", "latency_p50_ms", "speedup"} <= set(m)
        # In percent of the test split's images (a fraction, or a wrong denominator, fails).
        right = m["accuracy"] * n_test / 100
        assert 0 <= m["accuracy"] <= 100 and abs(right - round(right)) < 1e-6, (m, n_test)
        assert tags(c)["bonsai.cached"] == "false"  # built by the worker, not reused
    # The export computes what the student does (parity-checked): the same test accuracy.
    acc = {tags(c)["bonsai.stage"]: metrics(c)["accuracy"] for c in children}
    assert acc["onnx"] == acc["student"], acc
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["teacher._target_"] == "tests.nets.ResidualDepthwiseSE"
    # One logged model per stage, READY, its files in the server's artifact store.
    models = {m["info"]["source_run_id"]: m["info"] for m in servers.logged_models(exp)}
    for c in children:
        info = models[c["info"]["run_id"]]
        assert info["status"] == "LOGGED_MODEL_READY"
        assert info["name"] == tags(c)["bonsai.stage"]
        assert info["artifact_uri"].startswith("mlflow-artifacts:/")
    int8 = next(c for c in children if tags(c)["bonsai.stage"] == "int8")
    onnx_bytes = servers.artifact(
        models[int8["info"]["run_id"]]["artifact_uri"] + "/artifacts/bonsai_artifact/model.onnx"
    )
    assert len(onnx_bytes) == metrics(int8)["bytes"]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in x.shape]
    assert session.run(None, {x.name: np.zeros(shape, np.float32)})[0].shape[-1] == 4  # 4 classes

    # The shell command with the same overrides composes the same config: same config hash.
    shell = servers.run(["-m", "flows.compress", *overrides], timeout=300)
    assert shell.returncode == 0, shell.stderr[-3000:]
    parents = servers.runs(exp, "tags.`bonsai.role` = 'pipeline'")
    assert len(parents) == 2
    hashes = {p["info"]["run_id"]: tags(p)["bonsai.config_hash"] for p in parents}
    assert len(set(hashes.values())) == 1, hashes
    # ...and it reused the worker's builds: the store is shared.
    shell_parent = next(p for p in parents if p["info"]["run_id"] != parent["info"]["run_id"])
    shell_children = servers.runs(
        exp, f"tags.`mlflow.parentRunId` = '{shell_parent['info']['run_id']}'"
    )
    assert {tags(c)["bonsai.cached"] for c in shell_children} == {"true"}


def test_served_deployments_run_without_a_work_pool(servers, tiny_store):
    """`python -m flows.serve` (what compose.yaml's worker runs): this process registers the
    deployment, runs its flow runs, and answers the healthcheck the container uses."""
    import socket
    import subprocess
    import sys
    import urllib.request

    from tests.servers.procs import ROOT, stop_group

    exp = f"served-{uuid.uuid4().hex[:8]}"
    store = tiny_store
    overrides = [
        *TINY,
        "tracking=server",
        f"tracking.store_dir={store}",
        f"tracking.experiment={exp}",
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = servers.env(
        PREFECT_RUNNER_SERVER_ENABLE="true",
        PREFECT_RUNNER_SERVER_HOST="127.0.0.1",
        PREFECT_RUNNER_SERVER_PORT=str(port),
        BONSAI_HEALTH_URL=f"http://127.0.0.1:{port}/health",
    )
    log = servers.workdir / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--name", "served", "--cron", "0 4 * * *", "--", *overrides],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            health = subprocess.run([sys.executable, "-m", "flows.health"], cwd=ROOT, env=env)
            if health.returncode == 0:
                break
            time.sleep(1)
        else:
            raise AssertionError("the serving process never answered its healthcheck")
        run_id = servers.trigger("bonsai-compress/served")
        fr = servers.wait_flow_run(run_id, timeout=420)
        assert fr["state"]["type"] == "COMPLETED", fr["state"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
    finally:
        stop_group(proc)
    parents = servers.runs(exp, "tags.`bonsai.role` = 'pipeline'")
    assert [p["info"]["status"] for p in parents] == ["FINISHED"]
    children = servers.runs(exp, f"tags.`mlflow.parentRunId` = '{parents[0]['info']['run_id']}'")
    assert sorted(tags(c)["bonsai.stage"] for c in children) == sorted(STAGES)


def test_a_deployment_run_cannot_run_code_and_adds_only_what_its_owner_allowed(
    servers, workers, tiny_store, tmp_path
):
    """Issue 22 through a real server and worker: whoever may trigger a deployment sends
    parameters that would run a shell command, import code or move the output; every such run
    ends Failed with the reason before any stage, and nothing ran. A `_target_` outside
    models.allowed_modules is refused before its module is imported; one inside it must still
    be an nn.Module class. (The owner's own network from a package they allowed trains in the
    test above.)"""
    exp = f"guard-{uuid.uuid4().hex[:8]}"
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    base = [*TINY, "tracking=server", f"tracking.store_dir={tiny_store}",
            f"tracking.experiment={exp}"]  # fmt: skip
    # The owner's deployment trains their own network from a package they allowed (`tests`).
    owner = [*base, "teacher=custom", "teacher._target_=tests.nets.ResidualDepthwiseSE",
             "models.allowed_modules=[torchvision.models,bonsai,tests]"]  # fmt: skip
    # A second deployment whose owner lets runs pick the teacher class and its options.
    register = [
        ("guarded", [], owner),
        (
            "open",
            ["--allow", "teacher._target_", "--allow", "+teacher.*"],
            [*base, "teacher=custom"],
        ),
    ]
    for name, allow, overrides in register:
        reg = servers.run(
            ["-m", "flows.serve", "--pool", pool, "--name", name, *allow, "--", *overrides],
            timeout=120,
        )
        assert reg.returncode == 0, reg.stdout + reg.stderr
    proof = tmp_path / "SOMEFILE"
    # One attack per way a run is refused, each through the real worker; the variants of each
    # (os.system, builtins.eval, subprocess.Popen, torch.nn.Linear, hydra.run.dir...) are
    # refused by the same code paths, tested one by one in tests/unit/test_targets.py.
    attacks = {
        # (deployment, overrides sent with the run) -> what the failure must say
        ("guarded", ("teacher=custom", "teacher._target_=subprocess.run",
                     f"+teacher.args=[sh,-c,'id > {proof}']")): "key teacher._target_ matches none",
        ("guarded", (f"tracking.store_dir={tmp_path}/other",)): "key tracking.store_dir matches",
        ("open", ("teacher=resnet18",)): "not allowed: key teacher matches none",
        ("open", ("teacher._target_=subprocess.run", f"+teacher.args=[touch,{proof}]")):
            "module 'subprocess' is not under models.allowed_modules",
        ("open", ("teacher._target_=bonsai.models.build_model",)):
            "resolved to function bonsai.models.build_model",
    }  # fmt: skip
    workers(servers, pool)
    owners = {name: overrides for name, _, overrides in register}
    runs = {
        key: servers.trigger(f"bonsai-compress/{key[0]}", {"overrides": [*owners[key[0]], *key[1]]})
        for key in attacks
    }
    for key, run_id in runs.items():
        fr = servers.wait_flow_run(run_id, timeout=300)
        assert fr["state"]["type"] == "FAILED", (key, fr["state"])
        assert attacks[key] in fr["state"]["message"], (key, fr["state"]["message"])
        task_runs = servers.prefect.request(
            "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}}
        )
        assert task_runs == [], (key, "a stage started")
    assert not proof.exists(), "a parameter ran a command on the worker"
    assert not (tmp_path / "other").exists()
    # Nothing reached MLflow: every run failed before its pipeline created the experiment.
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as e:
        servers.experiment_id(exp)
    assert e.value.code == 404
