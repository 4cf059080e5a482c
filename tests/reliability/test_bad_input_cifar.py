"""Bad values of the CIFAR-10 work's knobs (resnet_cifar, the training-loop knobs, KD replay,
the cifar10_jpeg preset) are refused before any work, naming the key, the value and the fix.

Each case goes through `compose_config` + `prepare`, which validates config, graph and data and
starts nothing (no store, no Prefect, no MLflow run).
"""

import pytest

from bonsai.errors import BonsaiError, ConfigError, DataError
from flows.compress import compose_config, prepare

CASES = [
    # (id, overrides, error type, substrings the message must contain)
    (
        "resnet-depth-not-6n+2",
        ["teacher=resnet20", "teacher.depth=21"],
        ConfigError,
        ["pipeline.stages.teacher.model", "depth must be 6n+2", "[8, 14, 20, 32, 44, 56, 110]"],
    ),
    (
        "resnet-width-zero",
        ["student=resnet8", "student.width=0"],
        ConfigError,
        ["pipeline.stages.student.model", "width must be a number in (0, 16]", "got 0"],
    ),
    (
        "resnet-unknown-option",
        ["student=resnet8", "+student.blocks=2"],
        ConfigError,
        ["pipeline.stages.student.model", "no option(s) ['blocks']", "['depth', 'width']"],
    ),
    (
        "unknown-schedule",
        ["pipeline.stages.teacher.schedule=linear"],
        ConfigError,
        ["pipeline.stages.teacher.schedule", "'cosine' or 'onecycle'", "'linear'"],
    ),
    (
        "onecycle-without-warmup",
        ["pipeline.stages.teacher.schedule=onecycle"],
        ConfigError,
        ["pipeline.stages.teacher", "onecycle needs warmup_epochs > 0"],
    ),
    (
        "negative-warmup",
        ["pipeline.stages.student.warmup_epochs=-1"],
        ConfigError,
        ["pipeline.stages.student.warmup_epochs", "greater than or equal to 0", "-1"],
    ),
    (
        "channels-last-not-a-bool",
        ["pipeline.stages.teacher.channels_last=sometimes"],
        ConfigError,
        ["pipeline.stages.teacher.channels_last", "valid boolean", "'sometimes'"],
    ),
    (
        "negative-teacher-views",
        ["pipeline.stages.student.teacher_views=-2"],
        ConfigError,
        ["pipeline.stages.student.teacher_views", "greater than or equal to 0", "-2"],
    ),
    (
        "fractional-teacher-views",
        ["pipeline.stages.student.teacher_views=1.5"],
        ConfigError,
        ["pipeline.stages.student.teacher_views", "valid integer", "1.5"],
    ),
    (
        "teacher-views-on-train",
        ["+pipeline.stages.teacher.teacher_views=4"],
        ConfigError,
        ["pipeline.stages.teacher.teacher_views", "unknown key", "channels_last"],
    ),
    (
        "cifar10-jpeg-missing-root",
        ["data=cifar10_jpeg", "data.root=/no/such/cifar"],
        DataError,
        ["/no/such/cifar", "does not exist"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_cifar_knob_fails_first_with_a_clear_message(case, tmp_path):
    _, overrides, error, needles = case
    store = tmp_path / "mlruns"
    raw = compose_config([*overrides, f"tracking.store_dir={store}"])
    with pytest.raises(BonsaiError) as e:
        prepare(raw)
    assert isinstance(e.value, error), e.value
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not store.exists(), "nothing may be created"


def test_the_cifar_recipe_itself_is_accepted(tmp_path):
    """The same keys with good values pass (so the cases above fail for their values alone)."""
    from bonsai.config import validate_config

    raw = compose_config(
        [
            "teacher=resnet20",
            "student=resnet8",
            "pipeline.stages.teacher.schedule=onecycle",
            "pipeline.stages.teacher.warmup_epochs=1",
            "pipeline.stages.teacher.channels_last=true",
            "pipeline.stages.student.teacher_views=4",
            "pipeline.stages.student.augment=shift_flip",
            f"tracking.store_dir={tmp_path / 'mlruns'}",
        ]
    )
    _, plan = validate_config(raw)
    assert plan["teacher"].config.schedule == "onecycle"
    assert plan["student"].config.teacher_views == 4
