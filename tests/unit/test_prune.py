"""prune.structured and prune.unstructured on tiny data: each test proves an effect."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bonsai.artifacts import load_torch, open_artifact, save_torch
from bonsai.measure.evaluate import onnx_weight_sparsity, weight_sparsity, zipped_bytes
from bonsai.measure.latency import measure_latency_paired
from bonsai.models import build_model, count_macs, count_params
from bonsai.onnx_utils import session
from bonsai.stages.prune_unstructured import gradual_schedule, prune_to, rewind, snapshot
from bonsai.training import predict_logits
from tests.helpers import logits_in_fresh_process, run_stage

WIDE = {"name": "cnn", "width": 64, "depth": 2, "convs_per_stage": 2}  # 64-128 channels
SMALL = {"name": "cnn", "width": 16, "depth": 2, "convs_per_stage": 2}  # 16-32 channels
CUSTOM = {"_target_": "tests.nets.ResidualDepthwiseSE", "width": 8}


def accuracy(artifact, data) -> float:
    preds = predict_logits(load_torch(artifact), data.test_x).argmax(1)
    return 100 * float((preds == data.test_y).float().mean())


def out_channels(artifact) -> dict[str, int]:
    model = load_torch(artifact)
    return {
        n: m.weight.shape[0]
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }


def saved(model, spec, data, path):
    """An artifact of an in-memory model (e.g. an untrained torchvision network)."""
    path.mkdir(parents=True)
    meta = {
        "spec": spec,
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "params": count_params(model),
        "macs": count_macs(model, data.input_shape),
    }
    return save_torch(model, path, meta)


@pytest.fixture(scope="module")
def wide(synthetic, tmp_path_factory):
    return run_stage(
        "train", {"model": WIDE, "epochs": 3, "lr": 0.01}, synthetic, tmp_path_factory.mktemp("w")
    )


@pytest.fixture(scope="module")
def small(synthetic, tmp_path_factory):
    return run_stage(
        "train", {"model": SMALL, "epochs": 4, "lr": 0.01}, synthetic, tmp_path_factory.mktemp("s")
    )


# ---------------------------------------------------------------------------------------------
# prune.structured


def test_half_the_channels_cut_params_and_macs_by_60_percent_and_the_onnx_runs_faster(
    synthetic, wide, tmp_path
):
    pruned = run_stage("prune.structured", {"ratio": 0.5}, synthetic, tmp_path / "p", input=wide)
    before, after = wide.meta["model"], pruned.meta["model"]
    model = load_torch(pruned)  # the counts are those of the reloaded model, not just metadata
    assert count_params(model) == after["params"]
    assert count_macs(model, synthetic.input_shape) == after["macs"]
    assert 1 - after["params"] / before["params"] >= 0.60, (before["params"], after["params"])
    assert 1 - after["macs"] / before["macs"] >= 0.60, (before["macs"], after["macs"])
    assert out_channels(pruned)["features.0"] == 32  # really removed, not masked

    onnx_parent = run_stage("export.onnx", {}, synthetic, tmp_path / "po", input=wide)
    onnx_pruned = run_stage("export.onnx", {}, synthetic, tmp_path / "pp", input=pruned)
    lat = measure_latency_paired(
        {"parent": session(onnx_parent.file), "pruned": session(onnx_pruned.file)},
        synthetic.test_x[:1].numpy(),
        rounds=10,
        per_round=50,
    )
    speedup = lat["parent"]["latency_p50_ms"] / lat["pruned"]["latency_p50_ms"]
    print(f"onnxruntime p50 {lat} -> speedup {speedup:.2f}x")  # measured 2.7-2.8x
    assert speedup > 1.5, lat


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_importance_removes_the_channels_that_contribute_nothing(importance, synthetic, tmp_path):
    # One conv (8 channels) -> BN -> ReLU -> pool -> linear. Channels 0-3 are scaled down to
    # almost nothing in every coupled tensor (conv rows, BN affine, classifier columns): their
    # weights are tiny (l1/l2) and so is the loss gradient through them (taylor).
    torch.manual_seed(0)
    spec = {"name": "cnn", "width": 8, "depth": 1}
    model = build_model(spec, 1, 4)
    with torch.no_grad():
        for t in (model.features[0].weight, model.features[1].weight, model.features[1].bias):
            t[:4] *= 1e-3
        model.classifier.weight[:, :4] *= 1e-3
    art = saved(model, spec, synthetic, tmp_path / "m")
    pruned = run_stage(
        "prune.structured", {"ratio": 0.5, "importance": importance}, synthetic, tmp_path / "p",
        input=art,
    )  # fmt: skip
    kept = load_torch(pruned).features[0].weight
    assert kept.shape[0] == 4
    # The kept rows are exactly the original rows 4-7.
    assert torch.equal(kept, model.features[0].weight[4:])


def test_random_importance_is_a_control_that_ignores_the_weights(synthetic, tmp_path):
    torch.manual_seed(0)
    spec = {"name": "cnn", "width": 8, "depth": 1}
    model = build_model(spec, 1, 4)
    art = saved(model, spec, synthetic, tmp_path / "m")
    rows = model.features[0].weight.flatten(1)
    kept_sets = []
    for seed in range(3):
        pruned = run_stage(
            "prune.structured", {"ratio": 0.5, "importance": "random"}, synthetic,
            tmp_path / f"p{seed}", input=art, seed=seed,
        )  # fmt: skip
        kept = load_torch(pruned).features[0].weight.flatten(1)
        kept_sets.append(
            frozenset(int((rows - r).abs().sum(1).argmin()) for r in kept)  # row index of each
        )
    assert len(set(kept_sets)) > 1  # depends on the seed, not on the weights


@pytest.mark.parametrize("target, scope", [("target_macs", "global"), ("target_params", "uniform")])
def test_a_macs_or_params_target_is_reached_within_5_percent(
    target, scope, synthetic, wide, tmp_path
):
    key = target.removeprefix("target_")
    goal = int(wide.meta["model"][key] * 0.3)
    pruned = run_stage(
        "prune.structured", {"ratio": None, target: goal, "scope": scope}, synthetic,
        tmp_path / "p", input=wide,
    )  # fmt: skip
    reached = pruned.meta["model"][key]
    assert abs(reached - goal) <= 0.05 * goal, (goal, reached)


def test_uniform_prunes_every_layer_alike_and_global_ranks_across_layers(synthetic, wide, tmp_path):
    before = out_channels(wide)
    shares = {}
    for scope in ("uniform", "global"):
        pruned = run_stage(
            "prune.structured", {"ratio": 0.5, "scope": scope}, synthetic, tmp_path / scope,
            input=wide,
        )  # fmt: skip
        after = out_channels(pruned)
        shares[scope] = {n: after[n] / before[n] for n in before if n != "classifier"}
    assert set(shares["uniform"].values()) == {0.5}
    assert len(set(shares["global"].values())) > 1, shares["global"]  # layers differ


def test_round_to_keeps_channel_multiples_and_ignore_keeps_layers(synthetic, wide, tmp_path):
    pruned = run_stage(
        "prune.structured", {"ratio": 0.4, "round_to": 16, "ignore": ["features.3"]}, synthetic,
        tmp_path / "p", input=wide,
    )  # fmt: skip
    ch = out_channels(pruned)
    assert ch["features.3"] == 64  # ignored: all its output channels stay
    assert ch["classifier"] == synthetic.num_classes  # the head keeps every class
    pruned_layers = [n for n in ch if n not in ("features.3", "classifier")]
    assert all(ch[n] % 16 == 0 and ch[n] < out_channels(wide)[n] for n in pruned_layers), ch


def test_iterative_steps_reach_the_same_widths_with_the_epochs_split(synthetic, small, tmp_path):
    one = run_stage("prune.structured", {"ratio": 0.5}, synthetic, tmp_path / "one", input=small)
    two = run_stage(
        "prune.structured", {"ratio": 0.5, "iterative_steps": 2, "epochs": 3}, synthetic,
        tmp_path / "two", input=small,
    )  # fmt: skip
    assert out_channels(one) == out_channels(two)
    assert two.meta["pruning"]["step_ratios"] == [0.25, 0.5]
    assert len(two.meta["history"]) == 3  # 1 epoch after step 1, 2 after step 2


def test_fine_tuning_distills_from_the_teacher_stage(synthetic, small, tmp_path):
    # A teacher that is confidently wrong in a known way (labels shifted by one): with alpha=1
    # the pruned model learns only from the teacher, so it must come to agree with it.
    shifted = dataclasses.replace(
        synthetic, train_y=(synthetic.train_y + 1) % 4, test_y=(synthetic.test_y + 1) % 4
    )
    liar = run_stage("train", {"model": SMALL, "epochs": 4, "lr": 0.01}, shifted, tmp_path / "l")
    liar_preds = predict_logits(load_torch(liar), synthetic.test_x).argmax(1)
    params = {"ratio": 0.5, "epochs": 5, "lr": 0.005, "alpha": 1.0, "temperature": 2.0}
    kd = run_stage(
        "prune.structured", params, synthetic, tmp_path / "kd", input=small, teacher=liar
    )
    labels = run_stage("prune.structured", params, synthetic, tmp_path / "ce", input=small)

    def agree(art):
        return float(
            (predict_logits(load_torch(art), synthetic.test_x).argmax(1) == liar_preds)
            .float()
            .mean()
        )

    assert agree(kd) > 0.8, agree(kd)
    assert agree(labels) < 0.2, agree(labels)
    assert kd.meta["teacher_digest"] == liar.digest


ARCHITECTURES = [
    {"name": "cnn", "width": 16, "depth": 3, "convs_per_stage": 2},
    {"name": "resnet18"},
    {"name": "mobilenet_v3_small"},
    {"name": "efficientnet_b0"},
    CUSTOM,
]


def test_every_architecture_prunes_and_reloads_bit_identical_in_a_fresh_process(
    synthetic, tmp_path
):
    """resnet18 (residual adds), mobilenet_v3_small and efficientnet_b0 (depthwise convs, SE
    gates, hardswish / SiLU), the cnn family and the custom model, untrained, pruned by 30%;
    an unstructured-pruned cnn; and a resnet18 pruned in memory, whose logits before saving
    are the reference."""
    import torch_pruning as tp

    paths, logits, names = [], [], []
    x = synthetic.test_x[:8]

    def keep(art, name):
        paths.append(art.path)
        names.append(name)
        with torch.no_grad():
            logits.append(load_torch(open_artifact(art.path))(x).numpy())

    for i, spec in enumerate(ARCHITECTURES):
        torch.manual_seed(i)
        model = build_model(spec, synthetic.in_channels, synthetic.num_classes).eval()
        art = saved(model, spec, synthetic, tmp_path / f"in{i}")
        pruned = run_stage(
            "prune.structured", {"ratio": 0.3}, synthetic, tmp_path / f"p{i}", input=art
        )
        assert pruned.meta["model"]["params"] < 0.7 * art.meta["model"]["params"], spec
        assert pruned.meta["model"]["structure"], spec  # recorded, since it no longer fits
        keep(pruned, str(spec))
        if i == 0:
            sparse = run_stage("prune.unstructured", {}, synthetic, tmp_path / "u", input=art)
            keep(sparse, "unstructured")

    model = build_model({"name": "resnet18"}, 1, 4).eval()
    tp.pruner.MetaPruner(
        model,
        torch.zeros(1, 1, 8, 8),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[model.fc],
    ).step()
    art = saved(model, {"name": "resnet18"}, synthetic, tmp_path / "memory")
    assert {e["path"] for e in art.meta["model"]["structure"]} >= {"conv1", "bn1", "fc"}
    paths.append(art.path)
    names.append("in memory")
    with torch.no_grad():
        logits.append(model(x).numpy())  # the module that was saved, not a reload

    fresh = logits_in_fresh_process(paths, x, tmp_path)
    for name, a, b in zip(names, logits, fresh, strict=True):
        assert a.shape == (8, synthetic.num_classes)
        assert np.array_equal(a, b), name  # bit-identical


def test_the_custom_residual_depthwise_se_model_prunes_fine_tunes_and_exports(synthetic, tmp_path):
    # batch 16: the model's 13 batch norms need enough steps for their running statistics
    # (with 4 steps per epoch it scored 25% in eval mode and 98% in train mode).
    learn = {"lr": 0.003, "batch_size": 16}
    teacher = run_stage("train", {"model": CUSTOM, "epochs": 8, **learn}, synthetic, tmp_path / "t")
    raw = run_stage("prune.structured", {"ratio": 0.5}, synthetic, tmp_path / "raw", input=teacher)
    tuned = run_stage(
        "prune.structured", {"ratio": 0.5, "epochs": 3, **learn}, synthetic, tmp_path / "ft",
        input=teacher, teacher=teacher,
    )  # fmt: skip
    assert tuned.meta["model"]["params"] < 0.4 * teacher.meta["model"]["params"]
    ch = out_channels(tuned)
    # The residual stream, the depthwise convs and the SE gates shrank together.
    assert ch["stem.0"] == ch["blocks.0.project.0"] == 4
    assert ch["blocks.0.depthwise.0"] == ch["blocks.0.expand.0"] == 16
    print(
        {
            n: accuracy(a, synthetic)
            for n, a in (("teacher", teacher), ("raw", raw), ("tuned", tuned))
        }
    )
    assert accuracy(teacher, synthetic) > 90
    assert accuracy(tuned, synthetic) > accuracy(raw, synthetic)
    assert accuracy(tuned, synthetic) > 85
    exported = run_stage("export.onnx", {}, synthetic, tmp_path / "onnx", input=tuned)
    assert exported.meta["parity_max_abs_diff"] < 1e-4  # the gate passed


# ---------------------------------------------------------------------------------------------
# prune.unstructured


@pytest.mark.parametrize(
    "mode, scope",
    [("one_shot", "global"), ("one_shot", "layer"), ("gradual", "global"), ("lottery", "layer")],
)
def test_unstructured_pruning_hits_the_target_sparsity_and_folds_the_masks(
    mode, scope, synthetic, small, tmp_path
):
    params = {"sparsity": 0.7, "mode": mode, "scope": scope, "epochs": 2, "rewind_steps": 2}
    art = run_stage("prune.unstructured", params, synthetic, tmp_path / "s", input=small)
    model = load_torch(art)
    assert abs(weight_sparsity(model) - 70.0) <= 0.5
    if scope == "layer":
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m.weight.numel() >= 200:
                share = 100 * float((m.weight == 0).float().mean())
                assert abs(share - 70.0) <= 0.5, (name, share)
    # Plain tensors: the same keys as the input, no weight_orig / weight_mask.
    assert set(model.state_dict()) == set(load_torch(small).state_dict())
    assert "structure" not in art.meta["model"]


def test_80_percent_sparsity_cuts_zipped_bytes_by_40_percent_through_onnx_and_int8(
    synthetic, wide, tmp_path
):
    sparse = run_stage(
        "prune.unstructured", {"sparsity": 0.8}, synthetic, tmp_path / "s", input=wide
    )
    saving = 1 - zipped_bytes(sparse.file) / zipped_bytes(wide.file)
    assert saving >= 0.40, saving
    assert sparse.file.stat().st_size == wide.file.stat().st_size  # dense bytes unchanged
    exported = run_stage("export.onnx", {}, synthetic, tmp_path / "o", input=sparse)
    assert abs(onnx_weight_sparsity(exported.file) - 80.0) <= 0.5
    q = run_stage(
        "quantize.static", {"calibration_samples": 64, "tolerance": None}, synthetic,
        tmp_path / "q", input=exported,
    )  # fmt: skip
    # An int8 zero is a quantized value equal to its zero point; tiny survivors may round to it.
    assert 80.0 - 0.5 <= onnx_weight_sparsity(q.file) <= 85.0


def test_gradual_pruning_follows_the_cubic_schedule(synthetic, small, tmp_path):
    s = gradual_schedule(0.0, 0.8, total=100, ramp=0.5, n=5)
    assert list(s) == [10, 20, 30, 40, 50]
    assert [round(v, 4) for v in s.values()] == [0.3904, 0.6272, 0.7488, 0.7936, 0.8]
    art = run_stage(
        "prune.unstructured", {"sparsity": 0.8, "mode": "gradual", "epochs": 4, "updates": 4},
        synthetic, tmp_path / "g", input=small,
    )  # fmt: skip
    done = art.meta["pruning"]["schedule"]  # [step, sparsity reached] at each mask update
    total = 4 * -(-len(synthetic.train_x) // 64)
    plan = gradual_schedule(0.0, 0.8, total, 0.75, 4)
    assert [d[0] for d in done] == list(plan)
    assert np.allclose([d[1] for d in done], list(plan.values()), atol=1e-4)


def test_lottery_rounds_prune_geometrically_and_rewind_the_survivors(synthetic, small, tmp_path):
    art = run_stage(
        "prune.unstructured", {"sparsity": 0.875, "mode": "lottery", "rounds": 3, "epochs": 1,
                               "rewind_steps": 2},
        synthetic, tmp_path / "l", input=small,
    )  # fmt: skip
    # Each round removes half of what remains: 50%, 75%, 87.5%.
    assert np.allclose(art.meta["pruning"]["rounds"], [0.5, 0.75, 0.875], atol=1e-4)
    assert len(art.meta["history"]) == 4  # the dense training and three rounds

    # Rewinding: survivors take the saved values, pruned weights stay zero.
    model = load_torch(small)
    early = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "training" moved every weight
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    prune_to(targets, 0.5, "global")
    rewind(model, early)
    for name, m in targets:
        w = m.weight_orig * m.weight_mask
        kept = m.weight_mask.bool()
        assert torch.equal(w[kept], early[f"{name}.weight"][kept])
        assert torch.all(w[~kept] == 0)


# ---------------------------------------------------------------------------------------------
# The sparsity metric on ONNX files


def test_onnx_sparsity_counts_quantized_weights_at_their_zero_point(tmp_path):
    # A uint8 conv weight with zero point 128: the values equal to 128 dequantize to 0.
    q = np.array([128, 128, 128, 3, 200, 128, 128, 9], dtype=np.uint8).reshape(2, 1, 2, 2)
    w_init = numpy_helper.from_array(q, "w_q")
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "w_scale")
    zp = numpy_helper.from_array(np.array(128, dtype=np.uint8), "w_zp")
    dense = numpy_helper.from_array(np.array([[0.0, 1.0], [2.0, 0.0]], np.float32), "fc")
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"]),
            helper.make_node("Conv", ["x", "w"], ["y"]),
            helper.make_node("Flatten", ["y"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["out"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [w_init, scale, zp, dense],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    # 5 of 8 quantized conv weights are at the zero point, 2 of 4 float weights are 0.
    assert onnx_weight_sparsity(path) == pytest.approx(100 * 7 / 12)
