"""Bad input to the pruning, low-rank and feature-distillation stages is refused before any
compute: one ConfigError naming the key, the bad value and the valid options; no store, run or
artifact; exit status 2 from the command line.

Each case goes through `flows.compress.prepare`, which validates config, graph, data and the
checks that need the models built (layer names, channel counts), and starts nothing.
"""

import pytest

from bonsai.errors import ConfigError
from flows.compress import compose_config, prepare
from tests.helpers import run_cli

NARROW = ["teacher=cnn_large", "teacher.width=8", "teacher.depth=2"]  # 8-16 channels

CASES = [
    # (id, overrides, substrings the message must contain)
    (
        "ratio-zero",
        ["pipeline=prune", "pipeline.stages.pruned.ratio=0"],
        ["pipeline.stages.pruned.ratio", "greater than 0", "(got 0)"],
    ),
    (
        "ratio-one",
        ["pipeline=prune", "pipeline.stages.pruned.ratio=1"],
        ["pipeline.stages.pruned.ratio", "less than 1", "(got 1)"],
    ),
    (
        "sparsity-above-one",
        ["pipeline=sparse", "pipeline.stages.sparse.sparsity=1.2"],
        ["pipeline.stages.sparse.sparsity", "less than 1", "(got 1.2)"],
    ),
    (
        "sparsity-zero",
        ["pipeline=sparse", "pipeline.stages.sparse.sparsity=0.0"],
        ["pipeline.stages.sparse.sparsity", "greater than 0", "(got 0.0)"],
    ),
    (
        "ratio-empties-a-layer",
        ["pipeline=prune", *NARROW, "pipeline.stages.pruned.ratio=0.9"],
        [
            "pipeline.stages.pruned.ratio: 0.9 (round_to=1) would remove every channel of",
            "'features.0' (8 channels)",
            "valid: 0 < ratio <= 0.875",
        ],
    ),
    (
        "round-to-empties-a-layer",
        ["pipeline=prune", *NARROW, "pipeline.stages.pruned.round_to=16"],
        ["pipeline.stages.pruned.ratio: 0.5 (round_to=16)", "no ratio works", "lower round_to"],
    ),
    (
        "unknown-ignore-structured",
        ["pipeline=prune", "pipeline.stages.pruned.ignore=[layer9]"],
        [
            "pipeline.stages.pruned.ignore: no layer named 'layer9'",
            "valid names: conv1, layer1.0.conv1, layer1.0.conv2",
        ],
    ),
    (
        "unknown-ignore-unstructured",
        ["pipeline=sparse", "pipeline.stages.sparse.ignore=[fc2]"],
        ["pipeline.stages.sparse.ignore: no layer named 'fc2'", "did you mean", "'fc'"],
    ),
    (
        "unknown-ignore-lowrank",
        ["pipeline=lowrank", "teacher=cnn_large", "pipeline.stages.lowrank.ignore=[classifer]"],
        [
            "pipeline.stages.lowrank.ignore: no layer named 'classifer'",
            "did you mean 'classifier'?",
            "valid names: features.0, features.3",
        ],
    ),
    (
        # lowrank's input is a pruned distilled student: its layer names come from the student
        # spec, passed through the structural stage before it.
        "unknown-ignore-down-a-chain",
        ["pipeline=chain", "pipeline.stages.lowrank.ignore=[features.99]"],
        [
            "pipeline.stages.lowrank.ignore: no layer named 'features.99'",
            "valid names: features.0, features.3, features.7, features.10, classifier",
        ],
    ),
    (
        "unknown-student-feature",
        ["+pipeline.stages.student.features=[{student:features.99,teacher:layer1}]"],
        [
            "pipeline.stages.student.features.0.student: no layer named 'features.99'",
            "valid names: features, features.0, features.1",
        ],
    ),
    (
        "unknown-teacher-feature",
        ["+pipeline.stages.student.features=[{student:features.2,teacher:layer9}]"],
        [
            "pipeline.stages.student.features.0.teacher: no layer named 'layer9'",
            "valid names: conv1, bn1, relu",
        ],
    ),
    (
        "map-hinted-by-a-vector",
        ["+pipeline.stages.student.features=[{student:features.2,teacher:fc}]"],
        ["pipeline.stages.student.features.0", "pair maps with maps"],
    ),
    (
        "rank-zero",
        [
            "pipeline=lowrank",
            "pipeline.stages.lowrank.energy=null",
            "pipeline.stages.lowrank.rank_ratio=0",
        ],
        ["pipeline.stages.lowrank.rank_ratio", "greater than 0", "(got 0)"],
    ),
    (
        "energy-zero",
        ["pipeline=lowrank", "pipeline.stages.lowrank.energy=0"],
        ["pipeline.stages.lowrank.energy", "greater than 0", "(got 0)"],
    ),
    (
        "two-rank-rules",
        ["pipeline=lowrank", "pipeline.stages.lowrank.rank_ratio=0.5"],
        ["pipeline.stages.lowrank", "set exactly one of rank_ratio and energy", "energy=0.9"],
    ),
    (
        "two-pruning-targets",
        ["pipeline=prune", "pipeline.stages.pruned.target_macs=1000"],
        ["pipeline.stages.pruned", "set exactly one of ratio, target_macs", "target_macs=1000"],
    ),
    (
        "target-above-the-input",
        [
            "pipeline=prune",
            "pipeline.stages.pruned.ratio=null",
            "pipeline.stages.pruned.target_params=1e9",
        ],
        ["pipeline.stages.pruned.target_params: 1000000000 is not below", "valid: 1 <="],
    ),
    (
        "gradual-without-epochs",
        ["pipeline=sparse", "pipeline.stages.sparse.epochs=0"],
        ["pipeline.stages.sparse", "mode=gradual", "needs epochs >= 1", "epochs=0"],
    ),
    (
        "structured-pruning-of-onnx",
        ["pipeline=prune", "+pipeline.stages.again={kind:prune.structured,input:onnx}"],
        ["pipeline.stages.again.input", "prune.structured takes torch models", "produces onnx"],
    ),
    (
        "unstructured-pruning-of-int8",
        ["pipeline=sparse", "+pipeline.stages.again={kind:prune.unstructured,input:int8}"],
        ["pipeline.stages.again.input", "prune.unstructured takes torch models", "produces onnx"],
    ),
    (
        "lowrank-of-onnx",
        ["pipeline=lowrank", "+pipeline.stages.again={kind:lowrank,input:onnx}"],
        ["pipeline.stages.again.input", "lowrank takes torch models", "produces onnx"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_pruning_input_fails_before_any_work(case, tmp_path):
    _, overrides, needles = case
    store = tmp_path / "mlruns"
    raw = compose_config([*overrides, "data=synthetic", f"tracking.store_dir={store}"])
    with pytest.raises(ConfigError) as e:
        prepare(raw)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not store.exists()


def test_the_command_line_exits_2_before_creating_anything(tmp_path):
    store = tmp_path / "store"
    proc = run_cli(
        store, ["pipeline=prune", "data=synthetic", "pipeline.stages.pruned.ignore=[nope]"], 120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pipeline.stages.pruned.ignore: no layer named 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not store.exists()
