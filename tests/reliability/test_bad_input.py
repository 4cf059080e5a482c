"""Every kind of bad input fails before any work: one clear message, no MLflow run, no artifact.

Each case goes through the flow's entry point (`compress`), which validates config, graph, data
and model fit before it creates the store or starts Prefect.
"""

import numpy as np
import pytest
from PIL import Image

from bonsai.errors import BonsaiError, ConfigError, DataError
from flows.compress import compose_config, compress
from tests.helpers import run_module


def _images(root, counts, size=8):
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    return root


def _empty_class(root):
    _images(root, {"a": 3, "b": 3})
    (root / "c").mkdir()
    return root


def _unbalanced(root):
    return _images(root, {"many": 40, "few": 3})


def _one_training_image_per_class(root):
    _images(root / "train", {"a": 1, "b": 1})
    _images(root / "test", {"a": 2, "b": 2})
    return root


def _unreadable(root):
    _images(root, {"a": 3, "b": 3})
    (root / "a" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


CASES = [
    # (id, overrides, data setup or None, error type, substrings the message must contain)
    (
        "unknown-key",
        ["+pipeline.stages.teacher.epochz=3"],
        None,
        ConfigError,
        ["pipeline.stages.teacher.epochz", "unknown key", "valid keys: amp"],
    ),
    (
        "wrong-type",
        ["pipeline.stages.teacher.epochs=many"],
        None,
        ConfigError,
        ["pipeline.stages.teacher.epochs", "valid integer", "'many'"],
    ),
    (
        "negative-epochs",
        ["pipeline.stages.teacher.epochs=-3"],
        None,
        ConfigError,
        ["pipeline.stages.teacher.epochs", "greater than or equal to 1", "-3"],
    ),
    (
        "float-epochs-past-the-debug-cap",  # Hydra reads 1e9 as a float: not an epoch count
        ["debug=fast", "pipeline.stages.teacher.epochs=1e9"],
        None,
        ConfigError,
        ["pipeline.stages.teacher.epochs", "valid integer", "1000000000.0"],
    ),
    (
        "infinite-lr",
        ["pipeline.stages.teacher.lr=inf"],
        None,
        ConfigError,
        ["pipeline.stages.teacher.lr", "finite number"],
    ),
    (
        "negative-split-seed",
        ["data.split_seed=-1"],
        None,
        ConfigError,
        ["data.split_seed", "greater than or equal to 0", "-1"],
    ),
    (
        "val-size-out-of-range",
        ["data.val_size=1.0"],
        None,
        ConfigError,
        ["data.val_size", "less than 1", "1.0"],
    ),
    (
        "synthetic-too-small-for-a-validation-split",
        ["data=synthetic", "data.num_train=6"],
        None,
        ConfigError,
        ["num_train=6 gives 1 validation image(s)", "4 classes", "data.num_train to at least 40"],
    ),
    (
        "empty-validation-split",
        ["data=imagefolder"],
        _one_training_image_per_class,
        DataError,
        ["the validation split (data.val_size=0.1", "is empty", "at least two per class"],
    ),
    (
        "ratio-out-of-range",
        ["pipeline.stages.student.alpha=1.5"],
        None,
        ConfigError,
        ["pipeline.stages.student.alpha", "less than or equal to 1", "1.5"],
    ),
    (
        "unknown-stage-kind",
        ["pipeline.stages.int8.kind=quantize.magic"],
        None,
        ConfigError,
        [
            "pipeline.stages.int8.kind",
            "'quantize.magic'",
            "valid kinds: distill, export.coreml, export.litert, export.onnx",
        ],
    ),
    (
        "cycle",
        [
            "+pipeline.stages.a={kind:distill,teacher:teacher,input:b}",
            "+pipeline.stages.b={kind:distill,teacher:teacher,input:a}",
        ],
        None,
        ConfigError,
        ["a -> b", "cycle"],
    ),
    (
        "missing-input-stage",
        ["pipeline.stages.onnx.input=studnet"],
        None,
        ConfigError,
        ["pipeline.stages.onnx.input", "no stage named 'studnet'", "stages: teacher, student"],
    ),
    (
        "quantize-a-torch-model",
        ["pipeline.stages.int8.input=student"],
        None,
        ConfigError,
        ["pipeline.stages.int8.input", "quantize.static takes onnx", "produces torch"],
    ),
    (
        "distill-without-teacher",
        ["pipeline.stages.student.teacher=null"],
        None,
        ConfigError,
        ["pipeline.stages.student.teacher", "distill needs a teacher"],
    ),
    (
        "distill-from-onnx-teacher",
        ["pipeline.stages.student.teacher=onnx"],
        None,
        ConfigError,
        ["pipeline.stages.student.teacher", "must be a torch model", "produces onnx"],
    ),
    (
        "unknown-top-level-key",
        ["+learning_rate=0.1"],
        None,
        ConfigError,
        ["learning_rate", "unknown key", "valid keys: compare, data, eval"],
    ),
    (
        "unknown-model",
        ["teacher.name=resnet19"],
        None,
        ConfigError,
        ["pipeline.stages.teacher.model", "'resnet19'", "resnet18"],
    ),
    (
        "unknown-data-name",
        ["data.name=imagenet"],
        None,
        ConfigError,
        ["data", "'imagenet'", "'digits'"],
    ),
    (
        "missing-data-root",
        ["data=imagefolder", "data.root=/no/such/folder"],
        None,
        DataError,
        ["/no/such/folder", "does not exist"],
    ),
    (
        "empty-class-folder",
        ["data=imagefolder"],
        _empty_class,
        DataError,
        ["holds no images", "/c'"],
    ),
    (
        "unbalanced-classes",
        ["data=imagefolder"],
        _unbalanced,
        DataError,
        ["unbalanced", "'many' has 40", "'few' has 3", "data.max_imbalance"],
    ),
    (
        "unreadable-image",
        ["data=imagefolder"],
        _unreadable,
        DataError,
        ["truncated.png", "remove or replace"],
    ),
    (
        "class-count-mismatch",
        [
            "teacher=custom",
            "teacher._target_=tests.reliability.nets.TenClassNet",
            "data=synthetic",
        ],
        None,
        DataError,
        ["pipeline.stages.teacher.model", "outputs shape [2, 10]", "data has 4 classes"],
    ),
    (
        "channel-mismatch",
        [
            "teacher=custom",
            "teacher._target_=tests.reliability.nets.RGBOnlyNet",
        ],
        None,
        ConfigError,
        ["pipeline.stages.teacher.model", "cannot run on the data's images of shape [1, 8, 8]"],
    ),
    (
        "torchvision-files-missing",
        ["data=cifar10", "data.root=/no/cifar"],
        None,
        DataError,
        ["/no/cifar/cifar-10-batches-py", "data.download=true"],
    ),
    # Multi-task heads (bonsai/heads.py): refused with the key before any compute.
    (
        "head-without-labels",
        ["data.heads=[{name: parity}]"],
        None,
        ConfigError,
        ["data.heads.0", "head 'parity' has no labels", "even_odd"],
    ),
    (
        "head-unknown-mapping",
        ["data.heads=[{name: p, labels: odd_even}]"],
        None,
        ConfigError,
        ["data.heads.0.labels", "unknown label mapping 'odd_even'", "valid: classes"],
    ),
    (
        "head-mapping-misses-classes",
        ["data.heads=[{name: p, labels: {low: ['0', '1'], high: ['2']}}]"],
        None,
        ConfigError,
        ["data.heads.0.labels", "no label to class(es) ['3'"],
    ),
    (
        "head-mapping-of-another-data-set",
        ["heads=class_animal_vehicle"],
        None,
        ConfigError,
        ["data.heads.1.labels=animal_vehicle", "CIFAR-10's class names"],
    ),
    (
        "head-negative-weight",
        ["heads=digit_parity", "data.heads.1.weight=-0.5"],
        None,
        ConfigError,
        ["data.heads.1.weight", "greater than or equal to 0"],
    ),
    (
        "head-weights-all-zero",
        ["heads=digit_parity", "data.heads.0.weight=0", "data.heads.1.weight=0"],
        None,
        ConfigError,
        ["data.heads", "every head has weight 0"],
    ),
    (
        "mapping-over-an-image-folder-names-a-missing-class",
        ["data=imagefolder", "data.heads=[{name: g, labels: {x: [a, b], y: [zebra]}}]"],
        lambda root: _images(root, {"a": 3, "b": 3, "c": 3}),
        ConfigError,
        ["data.heads.0.labels", "maps class 'zebra'", "['a', 'b', 'c']"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_first_with_a_clear_message(case, tmp_path):
    _, overrides, setup, error, needles = case
    store = tmp_path / "mlruns"
    extra = []
    if setup is not None:
        extra = [f"data.root={setup(tmp_path / 'images')}"]
    raw = compose_config([*overrides, *extra, f"tracking.store_dir={store}"])
    with pytest.raises(BonsaiError) as e:
        compress(raw)
    assert isinstance(e.value, error), e.value
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not store.exists(), "no MLflow store, run or stage artifact may be created"


def test_at_least_fifteen_distinct_cases():
    assert len({c[0] for c in CASES}) >= 15


UNSAFE_NAMES = ["../../../evil", "/abs/path", "x" * 300, "évil", "a b", ""]


@pytest.mark.parametrize(
    "name", UNSAFE_NAMES, ids=["dotdot", "absolute", "long", "unicode", "space", "empty"]
)
def test_unsafe_stage_names_are_refused_before_any_work(name, tmp_path):
    store = tmp_path / "mlruns"
    raw = compose_config(["data=synthetic", f"tracking.store_dir={store}"])
    raw["pipeline"]["stages"][name] = {"kind": "export.onnx", "input": "student"}
    with pytest.raises(ConfigError, match="is not allowed; a stage name becomes a folder"):
        compress(raw)
    assert not store.exists()
    assert not (tmp_path / "evil").exists()


def test_unsafe_stage_name_in_a_pipeline_file_exits_2(tmp_path):
    """Through the command line, with the name written in a user's pipeline YAML."""

    (tmp_path / "conf" / "pipeline").mkdir(parents=True)
    (tmp_path / "conf" / "pipeline" / "evil.yaml").write_text(
        "name: evil\nreference: teacher\nstages:\n"
        "  teacher: {kind: train, model: {name: cnn}, epochs: 1}\n"
        "  ../../../evil: {kind: export.onnx, input: teacher}\n"
    )
    store = tmp_path / "store" / "mlruns"
    proc = run_module(
        "flows.compress",
        [
            "data=synthetic",
            "pipeline=evil",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            f"tracking.store_dir={store}",
        ],
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stage name '../../../evil' is not allowed" in proc.stderr
    assert not store.exists() and not (tmp_path / "evil").exists()


@pytest.mark.slow
def test_a_diverging_loss_fails_its_stage_at_once_and_caches_nothing(tmp_path, prefect_server):
    from bonsai.errors import StageFailed

    store = tmp_path / "mlruns"
    raw = compose_config(
        [
            "data=synthetic",
            "teacher=cnn_large",
            "pipeline.stages.teacher.epochs=50",  # hours if the loss were not checked
            "pipeline.stages.teacher.optimizer=sgd",
            "pipeline.stages.teacher.lr=1e30",
            "pipeline.stages.teacher.amp=false",
            "runtime.progress=false",
            f"tracking.store_dir={store}",
        ]
    )
    with pytest.raises(StageFailed) as e:
        compress(raw)
    msg = str(e.value)
    assert "stage 'teacher' (train) failed: TrainingDiverged" in msg, msg
    assert "at epoch 1, step" in msg and "lower lr" in msg, msg
    assert not list((store / "records").glob("teacher-*"))
    assert not [p for p in (store / "stages").glob("teacher-*")]


def test_a_target_that_would_run_a_command_is_refused_and_never_called(tmp_path):
    """Issue 22's reproduction from the command line: `_target_=subprocess.run` with arguments
    that create a file. The target is resolved and refused before anything is called."""
    from tests.helpers import run_cli

    proof = tmp_path / "SOMEFILE"
    store = tmp_path / "mlruns"
    out = run_cli(
        store,
        ["debug=fast", "teacher=custom", "teacher._target_=subprocess.run",
         f"+teacher.args=[touch,{proof}]"],
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert not proof.exists(), "the target was called"
    assert "model _target_ 'subprocess.run' resolved to function subprocess.run, not an " \
           "nn.Module class" in out.stderr  # fmt: skip
    assert "Traceback" not in out.stderr
    assert not store.exists()
