"""A recipe search (search=..., Hydra's Optuna sweeper) is refused before its first trial when
it cannot work: a direction against the policy's, a searched key that does not exist."""

import math

import pytest

from bonsai.errors import ConfigError
from flows.search import check_search, objective
from tests.helpers import run_cli


@pytest.mark.parametrize(
    "args",
    [["search=digits_recipes"], ["experiment=cifar10_frontier", "search=cifar10_recipes"]],
)
def test_the_search_presets_pass_their_own_checks(args):
    check_search(args)


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["search=digits_recipes", "hydra.sweeper.direction=maximize"],
            "hydra.sweeper.direction=maximize but policy 'edge_small' ranks by lowest bytes; "
            "set hydra.sweeper.direction=minimize",
        ),
        (
            ["search=digits_recipes", "promote=accurate_tiny"],
            "ranks by highest accuracy; set hydra.sweeper.direction=maximize",
        ),
        (
            ["search=digits_recipes", "pipeline.stages.student.alfa=interval(0.1,0.9)"],
            "pipeline.stages.student.alfa",
        ),
        (
            ["search=digits_recipes", "pipeline=default"],  # the space names a `pruned` stage
            "hydra.sweeper.params.pipeline.stages.pruned.ratio: pipeline.stages.pruned.ratio is "
            "not a key of the config",
        ),
    ],
)
def test_a_search_that_cannot_work_is_refused_naming_the_fix(args, needle):
    with pytest.raises(ConfigError) as e:
        check_search(args)
    assert needle in str(e.value)


def test_the_command_line_refuses_it_before_any_trial(tmp_path):
    store = tmp_path / "store"
    proc = run_cli(store, ["-m", "search=digits_recipes", "hydra.sweeper.direction=maximize"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bonsai: error:")]
    assert errors == [
        "bonsai: error: hydra.sweeper.direction=maximize but policy 'edge_small' ranks by "
        "lowest bytes; set hydra.sweeper.direction=minimize"
    ]
    assert "Traceback" not in proc.stderr
    assert not store.exists()  # nothing ran, nothing was created


def test_a_trial_whose_variants_all_miss_the_policy_scores_the_worst_value():
    assert objective({"winner": None, "lower_is_better": True, "value": None}) == math.inf
    assert objective({"winner": None, "lower_is_better": False, "value": None}) == -math.inf
    assert objective({"winner": "abc", "lower_is_better": True, "value": 1234.0}) == 1234.0
