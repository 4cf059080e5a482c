"""Promotion's bad input, through the command line: one message, exit 2, nothing registered."""

import pytest

from tests.helpers import run_module


@pytest.mark.parametrize(
    "args, needle",
    [
        (["promote=fastest_ever"], "unknown config option 'promote/fastest_ever'"),
        (
            ["promote=edge_small", "promote.constraints.max_bytes=-5"],
            "promote.constraints.max_bytes",
        ),
        (["promote=edge_small", "promote.objective.metric=speed"], "promote.objective.metric"),
        (
            ["promote=edge_small", "promote.model_name=team/model"],
            "is not a name MLflow accepts",
        ),
        ([], "choose a promotion policy: promote=<policy>"),
        (["promote=edge_small"], "no finished pipeline run"),  # an empty store
    ],
    ids=[
        "unknown-policy",
        "negative-bound",
        "unknown-metric",
        "bad-model-name",
        "no-policy",
        "no-runs",
    ],
)
def test_promote_refuses_bad_input_with_exit_2(args, needle, tmp_path):
    store = tmp_path / "mlruns"
    proc = run_module(
        "flows.promote",
        [*args, f"tracking.store_dir={store}"],
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bonsai: error:")]
    assert len(errors) == 1 and needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_replay_without_a_model_uri_says_what_it_takes(tmp_path):
    proc = run_module(
        "flows.replay",
        ["runs:/abc/model", f"tracking.store_dir={tmp_path}"],
        timeout=120,
    )
    assert proc.returncode == 2
    assert "replay takes a registered model: models:/<name>@<alias>" in proc.stderr
