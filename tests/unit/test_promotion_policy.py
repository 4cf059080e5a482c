"""The promotion policy as pure logic: constraints with their numbers, guards, the objective,
and when a new winner beats the champion."""

import pytest
from pydantic import ValidationError

from bonsai.promotion import Candidate, PolicyConfig, beats, check, decide


def cand(stage, kind="onnx", **metrics):
    base = {
        "accuracy": 98.0,  # test split: reported
        "accuracy_delta": -0.5,
        "val_accuracy": 97.5,  # validation split: decided by
        "val_accuracy_delta": -0.7,
        "bytes": 100_000,
        "latency_p50_ms": 0.05,
    }
    return Candidate(f"run-{stage}", stage, f"models:/m-{stage}", kind, {**base, **metrics})


def policy(**kw):
    return PolicyConfig.model_validate({"name": "p", "objective": {"metric": "bytes"}, **kw})


def test_each_failed_constraint_is_named_with_its_numbers():
    p = policy(constraints={"max_bytes": 50_000, "max_accuracy_drop": 0.2, "min_accuracy": 99})
    failed = check(cand("int8"), p)
    # The accuracy bounds are checked on the validation split, the test split's numbers shown.
    assert failed == [
        "bytes 100,000 > max_bytes 50,000",
        "validation accuracy drop 0.70 points > max_accuracy_drop 0.20 (test split: 0.50)",
        "validation accuracy 97.50% < min_accuracy 99.0 (test split: 98.00%)",
    ]


def test_a_guarded_or_torch_variant_is_never_the_winner():
    p = policy()
    slow = cand("dyn", bytes=10, speed_guard_ok=0.0, speedup_vs_parent=0.4)
    torch_model = cand("student", kind="torch", bytes=5)
    ok = cand("int8", bytes=90_000)
    assert decide([slow, torch_model, ok], p) is ok
    assert "speed guard failed: 0.40x" in slow.failed[0]
    assert "a torch model" in torch_model.failed[0]


def test_the_objective_ranks_and_validation_accuracy_breaks_ties():
    a, b, c = cand("a", bytes=500), cand("b", bytes=400), cand("c", bytes=400, val_accuracy=99.0)
    assert decide([a, b, c], policy()) is c
    fastest = policy(objective={"metric": "latency_p50_ms"})
    assert (
        decide([cand("x", latency_p50_ms=0.2), cand("y", latency_p50_ms=0.1)], fastest).stage == "y"
    )
    best = policy(objective={"metric": "accuracy"})
    assert decide([cand("x", val_accuracy=97.0), cand("y", val_accuracy=98.5)], best).stage == "y"


def test_when_the_splits_disagree_the_validation_winner_is_picked():
    # x is better on the test split, y on the validation split: ranking by test accuracy would
    # pick x, fitting the choice to the images the reported accuracy is measured on.
    x = cand("x", accuracy=99.0, val_accuracy=96.0, accuracy_delta=0.0, val_accuracy_delta=-2.0)
    y = cand("y", accuracy=97.0, val_accuracy=98.0, accuracy_delta=-2.0, val_accuracy_delta=0.0)
    assert decide([x, y], policy(objective={"metric": "accuracy"})) is y
    # The same for the constraints: y is within 1 point of the reference on validation, x not.
    within = policy(constraints={"max_accuracy_drop": 1.0})
    assert decide([x, y], within) is y
    assert x.failed == [
        "validation accuracy drop 2.00 points > max_accuracy_drop 1.00 (test split: 0.00)"
    ]
    assert decide([x, y], policy(constraints={"min_accuracy": 97.5})) is y


def test_a_candidate_without_validation_accuracy_is_excluded_not_ranked_by_test():
    # Recorded before the validation split existed: the best test accuracy, but no val metric.
    old = cand("old", accuracy=99.9, accuracy_delta=0.0)
    del old.metrics["val_accuracy"], old.metrics["val_accuracy_delta"]
    new = cand("new")
    for p in (policy(), policy(objective={"metric": "accuracy"})):
        assert decide([old, new], p) is new
        assert old.failed == [
            "no val_accuracy measured (a run from before the validation split): it is not "
            "ranked by its test accuracy; run its pipeline again to make it a candidate"
        ]
    assert decide([old], policy(objective={"metric": "accuracy"})) is None


def test_nothing_wins_when_nothing_passes():
    assert decide([cand("a"), cand("b")], policy(constraints={"max_bytes": 1})) is None


def test_beating_the_champion_needs_the_required_improvement():
    p = policy(min_improvement=0.1)
    assert beats(80, 100, p) and not beats(95, 100, p) and not beats(100, 100, p)
    acc = policy(objective={"metric": "accuracy"})
    assert beats(98.1, 98.0, acc) and not beats(97.9, 98.0, acc)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"constraints": {"max_bytes": -1}}, "greater than or equal to 0"),
        ({"objective": {"metric": "speed"}}, "'accuracy', 'latency_p50_ms'"),
        ({"model_name": "team/model"}, "is not a name MLflow accepts"),
        ({"model_name": "a:b"}, "is not a name MLflow accepts"),
        ({"constraints": {"max_mb": 3}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_policies_are_refused(bad, needle):
    with pytest.raises(ValidationError, match=needle):
        policy(**bad)
