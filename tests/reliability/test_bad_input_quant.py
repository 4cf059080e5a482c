"""Bad quantization settings are refused before any compute: the key, the bad value and the
valid options, exit status 2, nothing created.

Each case goes through `compose_config` + `prepare`, which validate config, graph and data and
start nothing (no store, no Prefect, no MLflow run); one case runs the command line end to end.
"""

import pytest

from bonsai.errors import ConfigError
from flows.compress import compose_config, prepare
from tests.helpers import run_cli

CASES = [
    # (id, overrides, substrings the message must contain: key, value, valid options)
    (
        "tolerance-above-100",
        ["pipeline=ptq", "pipeline.stages.int8.tolerance=150"],
        ["pipeline.stages.int8.tolerance", "within [0, 100]", "(got 150"],
    ),
    (
        "tolerance-negative",
        ["pipeline=ptq", "pipeline.stages.dynamic.tolerance=-0.5"],
        ["pipeline.stages.dynamic.tolerance", "within [0, 100]", "(got -0.5)"],
    ),
    (
        "tolerance-relative-above-100",
        [
            "pipeline=ptq",
            "pipeline.stages.fp16.tolerance_mode=relative",
            "pipeline.stages.fp16.tolerance=101",
        ],
        ["pipeline.stages.fp16.tolerance", "percent of the fp32 parent's accuracy", "(got 101"],
    ),
    (
        "unknown-tolerance-mode",
        ["pipeline=ptq", "pipeline.stages.int8.tolerance_mode=percent"],
        ["pipeline.stages.int8.tolerance_mode", "'absolute' or 'relative'", "(got 'percent')"],
    ),
    (
        "calibration-on-zero-samples",
        ["pipeline=ptq", "pipeline.stages.int8.calibration_samples=0"],
        ["pipeline.stages.int8.calibration_samples", "at least 1 sample", "(got 0)"],
    ),
    (
        "qat-calibration-on-zero-samples",
        ["pipeline=qat", "pipeline.stages.qat.calibration_samples=0"],
        ["pipeline.stages.qat.calibration_samples", "at least 1 sample", "(got 0)"],
    ),
    (
        "unknown-calibration-method",
        ["pipeline=ptq", "pipeline.stages.int8.calibrate_method=kl"],
        [
            "pipeline.stages.int8.calibrate_method",
            "'minmax', 'entropy' or 'percentile'",
            "(got 'kl')",
        ],
    ),
    (
        "qat-unknown-calibration-method",
        ["pipeline=qat", "pipeline.stages.qat.calibrate_method=entropy"],
        ["pipeline.stages.qat.calibrate_method", "'minmax' or 'percentile'", "(got 'entropy')"],
    ),
    (
        "fp16-on-a-torch-model",
        ["pipeline=ptq", "pipeline.stages.fp16.input=teacher"],
        ["pipeline.stages.fp16.input", "quantize.fp16 takes onnx models", "produces torch"],
    ),
    (
        "dynamic-on-a-torch-model",
        ["pipeline=ptq", "pipeline.stages.dynamic.input=teacher"],
        ["pipeline.stages.dynamic.input", "quantize.dynamic takes onnx models", "produces torch"],
    ),
    (
        "qat-on-an-onnx-model",
        ["pipeline=qat", "pipeline.stages.qat.input=onnx"],
        ["pipeline.stages.qat.input", "quantize.qat takes torch models", "produces onnx"],
    ),
    (
        "qat-teacher-is-onnx",
        ["pipeline=qat", "pipeline.stages.qat.teacher=onnx"],
        ["pipeline.stages.qat.teacher", "must be a torch model", "produces onnx"],
    ),
    (
        "min-speedup-negative",
        ["pipeline=ptq", "pipeline.stages.dynamic.min_speedup=-1"],
        ["pipeline.stages.dynamic.min_speedup", "finite ratio >= 0", "(got -1"],
    ),
    (
        "qat-min-speedup-negative",
        ["pipeline=qat", "pipeline.stages.qat.min_speedup=-0.1"],
        ["pipeline.stages.qat.min_speedup", "finite ratio >= 0", "(got -0.1)"],
    ),
    (
        "qat-zero-epochs",
        ["pipeline=qat", "pipeline.stages.qat.epochs=0"],
        ["pipeline.stages.qat.epochs", "greater than or equal to 1", "(got 0)"],
    ),
    (
        "unknown-range-mode",
        ["pipeline=qat", "pipeline.stages.qat.ranges=ema"],
        ["pipeline.stages.qat.ranges", "'tracked', 'learned' or 'calibrated'", "(got 'ema')"],
    ),
    (
        "max-float-layers-negative",
        ["pipeline=ptq", "pipeline.stages.int8.max_float_layers=-1"],
        ["pipeline.stages.int8.max_float_layers", "greater than or equal to 0", "(got -1)"],
    ),
    (
        "unknown-dynamic-op-type",
        ["pipeline=ptq", "pipeline.stages.dynamic.op_types=[Conv2d]"],
        ["pipeline.stages.dynamic.op_types.0", "'Conv', 'MatMul'", "(got 'Conv2d')"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_quantization_input_is_refused_before_any_compute(case, tmp_path):
    _, overrides, needles = case
    store = tmp_path / "mlruns"
    raw = compose_config([*overrides, f"tracking.store_dir={store}"])
    with pytest.raises(ConfigError) as e:
        prepare(raw)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not store.exists(), "nothing may be created"


def test_the_quantization_pipelines_are_valid_as_shipped(tmp_path):
    """The cases above fail because of their one override, not because of the pipelines."""
    for pipeline in ("ptq", "qat"):
        raw = compose_config([f"pipeline={pipeline}", f"tracking.store_dir={tmp_path}"])
        _, _, plan, _ = prepare(raw)
        assert plan.reference == "teacher"


def test_the_command_line_exits_2_naming_key_value_and_range(tmp_path):
    store = tmp_path / "store"
    proc = run_cli(store, ["pipeline=ptq", "pipeline.stages.int8.tolerance=150"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pipeline.stages.int8.tolerance" in proc.stderr and "[0, 100]" in proc.stderr
    assert "(got 150" in proc.stderr and "Traceback" not in proc.stderr
    # (Hydra's own run folder may appear; no MLflow store, no stage output.)
    assert not (store / "mlflow.db").exists() and not (store / "stages").exists()
