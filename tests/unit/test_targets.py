"""A run's parameters never run code: `_target_` is resolved and checked before anything is
called, and a deployment run adds only the overrides its owner allowed (issue 22).

The command-line reproduction is in tests/reliability/test_bad_input.py, the deployment one
through a real Prefect server and worker in tests/servers/test_deployment.py."""

from __future__ import annotations

import pytest

from bonsai.config import validate_config
from bonsai.errors import ConfigError
from bonsai.models import DEFAULT_ALLOWED_MODULES, build_model, check_targets, resolve_target
from flows.deployed import DEFAULT_ALLOW, compose, effective_overrides, sensitive

DANGEROUS = [
    ("subprocess.run", "function subprocess.run"),
    ("os.system", "built-in function posix.system"),
    ("builtins.eval", "built-in function builtins.eval"),
    ("subprocess.Popen", "class subprocess.Popen"),
    ("bonsai.models.build_model", "function bonsai.models.build_model"),  # allowed module
    ("os.path", "module posixpath"),
]


@pytest.mark.parametrize("target,what", DANGEROUS, ids=[t for t, _ in DANGEROUS])
def test_a_target_that_is_not_an_nn_module_class_is_refused_naming_what_it_is(
    target, what, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        resolve_target(target)
    assert f"resolved to {what}, not an nn.Module class" in str(e.value)
    # ...and building never calls it, whatever arguments the spec carries.
    proof = tmp_path / "ran"
    with pytest.raises(ConfigError):
        build_model({"_target_": target, "args": ["touch", str(proof)]}, 1, 10)
    assert not proof.exists()


@pytest.mark.parametrize("target,what", DANGEROUS, ids=[t for t, _ in DANGEROUS])
def test_the_command_lines_config_refuses_it_at_validation(target, what, tmp_path):
    proof = tmp_path / "ran"
    raw = compose(
        ["debug=fast", "teacher=custom", f"teacher._target_={target}",
         f"+teacher.args=[touch,{proof}]", f"tracking.store_dir={tmp_path / 'store'}"]
    )  # fmt: skip
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    assert f"model _target_ {target!r} resolved to {what}" in str(e.value)
    assert not proof.exists()


def test_a_student_target_unused_by_the_pipeline_is_still_checked(tmp_path):
    raw = compose(
        ["student=custom", "student._target_=os.system", f"tracking.store_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="student: model _target_ 'os.system' resolved to"):
        validate_config(raw)


@pytest.mark.parametrize(
    "target,needle",
    [
        ("not a path", "is not an import path"),
        ("nopkg_xyz.Net", "cannot be imported"),
        ("bonsai.models.NoSuchNet", "has no attribute 'NoSuchNet'"),
        (42, "is not an import path"),
    ],
)
def test_unusable_targets_are_refused_with_the_fix(target, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_target(target)


def test_the_custom_network_path_still_builds(tmp_path):
    raw = compose(
        ["debug=fast", "teacher=custom", "teacher._target_=tests.nets.ResidualDepthwiseSE",
         "+teacher.width=8", f"tracking.store_dir={tmp_path}"]
    )  # fmt: skip
    cfg, plan = validate_config(raw)
    model = build_model(cfg.teacher, 1, 10)
    assert type(model).__name__ == "ResidualDepthwiseSE"
    # An option the constructor lacks is refused at validation, naming the ones it takes.
    bad = compose(
        ["teacher=custom", "teacher._target_=tests.nets.ResidualDepthwiseSE", "+teacher.depth=3",
         f"tracking.store_dir={tmp_path}"]
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"takes no option\(s\) \['depth'\].*'width'"):
        validate_config(bad)


def test_torchvisions_registered_model_builders_are_the_only_functions_allowed():
    import torchvision.models as tvm

    assert resolve_target("torchvision.models.resnet18") is tvm.resnet18
    assert type(build_model({"_target_": "torchvision.models.resnet18", "num_classes": 3}, 3, 3))
    # Functions of the same module that are not model builders are refused.
    for target in ("torchvision.models.get_model", "torchvision.models.list_models"):
        with pytest.raises(ConfigError, match="not an nn.Module class"):
            resolve_target(target)


def test_allowed_modules_limit_what_may_be_imported():
    allowed = list(DEFAULT_ALLOWED_MODULES)
    assert resolve_target("bonsai.models.SmallCNN", allowed).__name__ == "SmallCNN"
    assert resolve_target("torchvision.models.resnet.ResNet", allowed).__name__ == "ResNet"
    for target in ("torch.nn.Linear", "tests.nets.ResidualDepthwiseSE", "bonsai_evil.Net"):
        with pytest.raises(ConfigError, match="is not under models.allowed_modules"):
            resolve_target(target, allowed)
    assert resolve_target("tests.nets.ResidualDepthwiseSE", [*allowed, "tests"])


def test_check_targets_finds_every_target_in_a_config():
    config = {
        "teacher": {"_target_": "bonsai.models.SmallCNN"},
        "pipeline": {"stages": {"s": {"model": {"_target_": "torch.nn.Linear"}}}},
    }
    with pytest.raises(ConfigError, match=r"^pipeline\.stages\.s\.model\._target_: .*torch\.nn"):
        check_targets(config, DEFAULT_ALLOWED_MODULES)
    check_targets(config, [*DEFAULT_ALLOWED_MODULES, "torch.nn"])


# ---------------------------------------------------------------------------------------------
# What a deployment run may add to its owner's overrides


OWNER = ["data=synthetic", "debug=fast", "seed=1"]
REFUSED = [
    (["teacher=custom", "teacher._target_=subprocess.run", "+teacher.args=[sh,-c,'id > X']"],
     "'teacher=custom' is not allowed"),
    (["teacher._target_=os.system"], "key teacher._target_ matches none"),
    (["pipeline.stages.teacher.model._target_=builtins.eval"], "names code to import and call"),
    (["hydra.run.dir=/tmp/elsewhere"], "key hydra.run.dir matches none"),
    (["hydra/launcher=joblib"], "Hydra's settings"),
    (["tracking.store_dir=/tmp/elsewhere"], "decides where runs and artifacts are written"),
    (["tracking.uri=http://127.0.0.1:1"], "key tracking.uri matches none"),
    (["data.root=/etc"], "is a path, address or program"),
    (["data=imagefolder"], "chooses the data set"),
    (["runtime.dask_address=tcp://127.0.0.1:1"], "is a path, address or program"),
    (["models.allowed_modules=[os]"], "which modules a `_target_` may import"),
    (["+seed2=1"], "needs a pattern that starts with +"),
    (["~seed"], "needs a pattern that starts with ~"),
    (["seed=${oc.env:HOME}"], "interpolations"),
    (["pipeline.stages.teacher.lr=${seed}"], "interpolations"),
]  # fmt: skip


@pytest.mark.parametrize("requested,needle", REFUSED, ids=[r[0][-1] for r in REFUSED])
def test_a_deployment_run_refuses_what_its_owner_did_not_allow(requested, needle):
    with pytest.raises(ConfigError) as e:
        effective_overrides(OWNER, [*OWNER, *requested], list(DEFAULT_ALLOW))
    assert needle in str(e.value)
    assert "README: Security" in str(e.value) or "interpolations" in needle


def test_the_default_allow_list_retrains_and_owner_overrides_always_apply():
    got = effective_overrides(
        OWNER, ["seed=7", "pipeline.stages.student.epochs=2", "pipeline.stages.student.lr=0.01",
                "data.max_train=64"], list(DEFAULT_ALLOW)
    )  # fmt: skip
    # The owner's `seed=1` gives way to the run's; the owner's other overrides stay even though
    # the run did not repeat them (a run cannot drop `tracking=server`, say).
    assert got == ["data=synthetic", "debug=fast", "seed=7", "pipeline.stages.student.epochs=2",
                   "pipeline.stages.student.lr=0.01", "data.max_train=64"]  # fmt: skip
    assert effective_overrides(OWNER, OWNER, []) == OWNER  # the registered run, unchanged


def test_a_wildcard_never_grants_a_sensitive_key_only_a_pattern_naming_it():
    run = ["teacher._target_=tests.nets.ResidualDepthwiseSE"]
    for broad in (["*"], ["teacher.*"], ["*.*"]):
        with pytest.raises(ConfigError, match="only a pattern that names it grants it"):
            effective_overrides([], run, broad)
    assert effective_overrides([], run, ["teacher._target_"]) == run
    assert effective_overrides([], run, ["*._target_"]) == run
    assert effective_overrides([], ["+teacher.width=4"], ["+teacher.*"]) == ["+teacher.width=4"]
    with pytest.raises(ConfigError, match="starts with +"):
        effective_overrides([], ["+teacher.width=4"], ["teacher.*"])
    assert effective_overrides([], ["tracking.store_dir=/x"], ["tracking.*"])


@pytest.mark.parametrize(
    "key,is_sensitive",
    [("seed", False), ("pipeline.stages.x.epochs", False), ("teacher", False),
     ("hydra.sweep.dir", True), ("hydra/launcher", True), ("x._args_", True),
     ("tracking.experiment", True), ("data.cache_dir", True), ("pipeline.stages.x.python", True),
     ("pipeline.stages.model.path", True), ("data.max_train", False)],
)  # fmt: skip
def test_sensitive_keys(key, is_sensitive):
    assert (sensitive(key) is not None) is is_sensitive
