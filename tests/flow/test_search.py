"""A recipe search through the command line: Optuna trials are ordinary pipeline runs that share
the cached teacher, each scored by what promotion would pick from its variants."""

import math

import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, store_runs


def test_a_search_runs_trials_that_share_the_teacher_and_scores_each_by_the_policy(tmp_path):
    store = tmp_path / "store"
    proc = run_cli(
        store,
        ["-m", "search=digits_recipes", "debug=fast", "hydra.sweeper.n_trials=2",
         "runtime.progress=false"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = store_runs(store)
    trials = sorted(
        (r for r in runs if r.data.tags.get("bonsai.role") == "pipeline"),
        key=lambda r: r.info.start_time,
    )
    assert [t.data.tags.get("bonsai.pipeline") for t in trials] == ["recipe", "recipe"]
    # The trials differ in the searched knobs...
    params = [
        {k: v for k, v in t.data.params.items() if k.startswith("pipeline.stages.student.")}
        for t in trials
    ]
    assert (
        params[0]["pipeline.stages.student.temperature"]
        != params[1]["pipeline.stages.student.temperature"]
    )
    # ...and share one teacher: built by the first trial, a cache hit in the second.
    teachers = sorted(
        (r for r in runs if r.data.tags.get("bonsai.stage") == "teacher"),
        key=lambda r: r.info.start_time,
    )
    assert len(teachers) == 2
    assert teachers[0].data.tags.get("bonsai.cached") == "false"
    assert teachers[1].data.tags.get("bonsai.cached") == "true"
    assert teachers[0].data.tags["bonsai.build_id"] == teachers[1].data.tags["bonsai.build_id"]
    # Each trial's promotion decision is a dry run: nothing is registered during a search.
    promos = [r for r in runs if r.data.tags.get("bonsai.role") == "promote"]
    assert len(promos) == 2
    assert MlflowClient(f"sqlite:///{store}/mlflow.db").search_registered_models() == []
    # The objective each trial returned is the bytes of its policy winner (or +inf).
    values = []
    for p in sorted(promos, key=lambda r: r.info.start_time):
        winner = p.data.tags.get("bonsai.winner_run_id")
        values.append(
            next(r for r in runs if r.info.run_id == winner).data.metrics["bytes"]
            if winner
            else math.inf
        )
    results = list(store.glob("hydra/multirun/*/optimization_results.yaml"))
    assert len(results) == 1
    best = yaml.safe_load(results[0].read_text())
    assert best["best_value"] == min(values)
    assert f"bonsai: search best: bytes = {best['best_value']}" in proc.stdout
    assert "python -m flows.promote promote=edge_small promote.scope=experiment" in proc.stdout
    assert "bonsai: sweep finished: all 2 job(s) succeeded" in proc.stdout
