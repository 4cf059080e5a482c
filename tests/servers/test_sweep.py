"""A 4-job sweep in parallel processes (Hydra's joblib launcher) against the real servers: every
job's parent run FINISHED with every child run, every flow run COMPLETED, nothing lost."""

from __future__ import annotations

import uuid

import pytest

from tests.servers.conftest import STAGES, TINY, metrics, tags

pytestmark = [pytest.mark.slow, pytest.mark.servers]


def test_a_parallel_sweep_against_the_servers_loses_nothing(servers):
    exp = f"sweep-{uuid.uuid4().hex[:8]}"
    store = servers.store()
    out = servers.run(
        [
            "-m", "flows.compress", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
            "pipeline.stages.student.temperature=1,2,3,4", *TINY, "tracking=server",
            f"tracking.store_dir={store}", f"tracking.experiment={exp}",
        ],
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all 4 job(s) succeeded" in out.stdout

    parents = servers.runs(exp, "tags.`bonsai.role` = 'pipeline'")
    assert len(parents) == 4
    assert {p["info"]["status"] for p in parents} == {"FINISHED"}
    temperatures = set()
    built = []
    for p in parents:
        temperatures.add(
            next(
                x["value"]
                for x in p["data"]["params"]
                if x["key"] == "pipeline.stages.student.temperature"
            )
        )
        children = servers.runs(exp, f"tags.`mlflow.parentRunId` = '{p['info']['run_id']}'")
        assert sorted(tags(c)["bonsai.stage"] for c in children) == sorted(STAGES)
        assert {c["info"]["status"] for c in children} == {"FINISHED"}
        for c in children:
            assert {"accuracy", "bytes", "latency_p50_ms"} <= set(metrics(c))
            if tags(c)["bonsai.cached"] == "false":
                built.append(tags(c)["bonsai.stage"])
        # the comparison of each job reached its parent run
        assert {"student.accuracy", "int8.bytes"} <= set(metrics(p))
    assert temperatures == {"1", "2", "3", "4"}
    # The 4 jobs share one store: the teacher was built once, each job built its own student.
    assert built.count("teacher") == 1
    assert built.count("student") == 4

    # Prefect recorded 4 completed pipeline flow runs for this sweep.
    runs = servers.prefect.request("POST", "/flow_runs/filter", {"limit": 200})
    mine = [
        r for r in runs
        if any(f"tracking.experiment={exp}" == o for o in (r.get("parameters") or {}).get("overrides", []))
    ]  # fmt: skip
    assert len(mine) == 4
    assert {r["state"]["type"] for r in mine} == {"COMPLETED"}
