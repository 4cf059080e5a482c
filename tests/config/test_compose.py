"""Every option in conf/ composes and validates; invalid configs fail naming key and fix."""

from pathlib import Path

import pytest

from bonsai.config import validate_config
from bonsai.errors import ConfigError
from flows.compress import CONF_DIR, apply_caps, compose_config
from tests.helpers import run_cli

# `stage/` holds presets that pipelines pull in (one per stage kind), not a top-level group.
GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "stage")
# Values a group leaves for the user to fill (`???`), given here so the option can compose.
REQUIRED = {
    "data=imagefolder": ["data.root=/some/images"],
    # Validating reads no file: the import's file is checked at pre-flight (prepare).
    "pipeline=from_checkpoint": ["pipeline.stages.model.path=/some/model.pt2"],
    "pipeline=from_checkpoint_distill": ["pipeline.stages.model.path=/some/model.pt2"],
    "pipeline=from_onnx": ["pipeline.stages.model.path=/some/model.onnx"],
}


def options():
    for group in GROUPS:
        for f in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            yield f"{group}={f.stem}"


def test_every_group_has_options():
    assert {"data", "teacher", "student", "pipeline", "tracking", "debug", "experiment"} <= set(
        GROUPS
    )
    assert len(list(options())) >= 18


@pytest.mark.parametrize("option", list(options()))
def test_every_option_composes_and_validates(option):
    raw = compose_config([option, *REQUIRED.get(option, [])])
    cfg, plan = validate_config(apply_caps(raw))
    group, name = option.split("=")
    if group == "data":
        # Presets over the imagefolder loader (the shared CIFAR-10 JPEG copy) keep its name.
        assert cfg.data.name == {"cifar10_jpeg": "imagefolder"}.get(name, name)
    assert plan.names()[0] == plan.reference or plan.reference in plan.names()


def test_default_config_is_the_documented_pipeline():
    cfg, plan = validate_config(compose_config([]))
    assert plan.names() == ["teacher", "student", "onnx", "int8"]
    assert cfg.data.name == "digits"
    assert plan["teacher"].config.model["name"] == "resnet18"
    assert plan["student"].teacher == "teacher"


def test_stage_parameters_override_from_the_shell():
    raw = compose_config(
        [
            "pipeline.stages.teacher.epochs=3",
            "pipeline.stages.student.temperature=2",
            "student=cnn_tiny",
        ]
    )
    _, plan = validate_config(raw)
    assert plan["teacher"].config.epochs == 3
    assert plan["student"].config.temperature == 2.0
    assert plan["student"].config.model["width"] == 16


def test_every_stage_kind_has_a_preset_listing_every_knob():
    """A preset lists exactly its kind's config fields, so every knob is settable from the shell
    without `+` and a new field cannot be forgotten in the YAML."""
    import yaml

    from bonsai.stages import REGISTRY

    presets = {}
    for f in sorted((Path(CONF_DIR) / "stage").glob("*.yaml")):
        preset = yaml.safe_load(f.read_text())
        presets[preset["kind"]] = preset
        assert f.stem == preset["kind"].replace(".", "_"), f
    assert set(presets) == set(REGISTRY)
    for kind, preset in presets.items():
        fields = REGISTRY[kind].Config.model_fields
        assert set(preset) - {"kind"} == set(fields), kind
        for name, field in fields.items():
            if not field.is_required():
                assert preset[name] == field.default, (kind, name, preset[name], field.default)


def test_any_stage_knob_overrides_without_plus():
    raw = compose_config(
        [
            "pipeline.stages.teacher.weight_decay=5e-4",
            "pipeline.stages.int8.calibrate_method=entropy",
        ]
    )
    _, plan = validate_config(raw)
    assert plan["teacher"].config.weight_decay == 5e-4
    assert plan["int8"].config.calibrate_method == "entropy"


def test_debug_fast_caps_every_stage_epochs():
    _, plan = validate_config(apply_caps(compose_config(["debug=fast"])))
    assert all(s.config.epochs == 1 for s in plan.stages if hasattr(s.config, "epochs"))


BAD = [
    (
        ["pipeline.stages.teacher.epochs=-1"],
        "pipeline.stages.teacher.epochs",
        "greater than or equal to 1",
    ),
    (
        ["pipeline.stages.student.alpha=1.5"],
        "pipeline.stages.student.alpha",
        "less than or equal to 1",
    ),
    (
        ["+pipeline.stages.teacher.epochz=3"],
        "pipeline.stages.teacher.epochz",
        "valid keys: amp, augment",
    ),
    (["pipeline.stages.teacher.optimizer=rmsprop"], "optimizer", "'adam', 'adamw' or 'sgd'"),
    (["pipeline.stages.onnx.kind=prune.magic"], "pipeline.stages.onnx.kind", "valid kinds:"),
    (
        ["pipeline.stages.int8.input=student"],
        "pipeline.stages.int8.input",
        "quantize.static takes onnx",
    ),
    (
        ["pipeline.stages.onnx.input=nowhere"],
        "pipeline.stages.onnx.input",
        "no stage named 'nowhere'",
    ),
    (
        ["pipeline.stages.student.teacher=null"],
        "pipeline.stages.student.teacher",
        "needs a teacher",
    ),
    (
        ["pipeline.stages.student.teacher=onnx"],
        "pipeline.stages.student.teacher",
        "must be a torch model",
    ),
    (
        [
            "+pipeline.stages.a={kind:distill,teacher:teacher,input:b}",
            "+pipeline.stages.b={kind:distill,teacher:teacher,input:a}",
        ],
        "a -> b",
        "cycle",
    ),
    (
        ["+pipeline.stages.teacher.input=student"],
        "pipeline.stages.teacher.input",
        "train takes no input",
    ),
    (["pipeline.reference=nobody"], "pipeline.reference", "no stage named 'nobody'"),
    (["teacher.name=vgg"], "pipeline.stages.teacher.model", "valid names:"),
    (["+teacher.widht=3", "teacher=cnn_large"], "pipeline.stages.teacher.model", "widht"),
    (["data.test_size=1.5"], "data.test_size", "less than 1"),
    (["+data.bogus=1"], "data.bogus", "valid keys:"),
    (["eval.threads=0"], "eval.threads", "greater than or equal to 1"),
    (["seed=abc"], "seed", "valid integer"),
]


@pytest.mark.parametrize("overrides, key, hint", BAD, ids=[b[0][0] for b in BAD])
def test_invalid_config_names_the_key_and_the_fix(overrides, key, hint):
    with pytest.raises(ConfigError) as e:
        validate_config(compose_config(overrides))
    assert key in str(e.value)
    assert hint in str(e.value)


def test_cli_refuses_bad_config_before_any_run(tmp_path):
    store = tmp_path / "store"
    proc = run_cli(store, ["pipeline.stages.teacher.epochs=0"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pipeline.stages.teacher.epochs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (store / "mlflow.db").exists()
    assert not (store / "stages").exists()


def test_the_issue_example_command_composes():
    raw = compose_config(
        [
            "teacher=resnet18",
            "student=cnn_small",
            "pipeline.stages.student.temperature=2",
            "data=imagefolder",
            "data.root=/path",
        ]
    )
    cfg, plan = validate_config(raw)
    assert cfg.data.root == "/path"
    assert plan["student"].config.temperature == 2.0
