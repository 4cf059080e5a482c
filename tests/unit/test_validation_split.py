"""The validation split (`data.val_size`): carved out of the training images, disjoint from the
other splits, fixed by `split_seed` alone, and the split every accuracy decision is made on
(quantization gates and the static fallback; promotion is in test_promotion_policy.py), while
the test split only reports."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from bonsai.artifacts import load_torch, save_torch
from bonsai.data import DataConfig, load_data
from bonsai.errors import DataError, GateError
from bonsai.measure.compare import Variant, compare
from bonsai.measure.evaluate import evaluate, top1
from bonsai.onnx_utils import run_logits, session
from bonsai.stages import get_stage
from bonsai.stages.quantize_common import accuracy_check
from bonsai.training import predict_logits, seed_everything
from tests.helpers import run_stage

CLASSES = ("a", "b", "c")


def numbered_folder(root, per_class: int, split: str | None = None, start: int = 0) -> dict:
    """8x8 grayscale PNGs whose pixel (0, 0) is the file's own number: every file unique, so
    an image found in a split names the file it came from (not merely equal pixels). Returns
    {number: class index}."""
    rng = np.random.default_rng(start)
    owner, n = {}, start
    for k, c in enumerate(CLASSES):
        folder = root / split / c if split else root / c
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(per_class):
            a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            a[0, 0] = n
            Image.fromarray(a, mode="L").save(folder / f"{n}.png")
            owner[n] = k
            n += 1
    return owner


def numbers(x: torch.Tensor, data) -> list[int]:
    """The file numbers of normalized images [N, 1, 8, 8] (undoing the normalization)."""
    unit = x[:, 0, 0, 0].numpy() * data.std[0] + data.mean[0]
    return np.rint(unit * 255).astype(int).tolist()


def splits(data) -> dict[str, list[int]]:
    return {
        "train": numbers(data.train_x, data),
        "val": numbers(data.val_x, data),
        "test": data.raw_test[:, 0, 0, 0].astype(int).tolist(),  # raw uint8 NHWC
    }


def folder_cfg(root, **kw) -> dict:
    return {"name": "imagefolder", "root": str(root), "image_size": 8, "channels": 1, **kw}


@pytest.mark.parametrize("layout", ["one folder, split by test_size", "train/ and test/ folders"])
def test_train_validation_and_test_hold_different_source_images(tmp_path, layout):
    if layout.startswith("one"):
        owner = numbered_folder(tmp_path, 30)
    else:
        owner = numbered_folder(tmp_path, 30, "train")
        owner |= numbered_folder(tmp_path, 8, "test", start=100)
    d = load_data(folder_cfg(tmp_path))
    got = splits(d)
    for name, ids in got.items():
        assert len(set(ids)) == len(ids), f"{name}: an image twice"
    # Pairwise disjoint, and together every file exactly once.
    assert not set(got["train"]) & set(got["val"])
    assert not set(got["train"]) & set(got["test"])
    assert not set(got["val"]) & set(got["test"])
    assert sorted(got["train"] + got["val"] + got["test"]) == sorted(owner)
    # Each image keeps its own label; the validation split is stratified (3 of each class's
    # 30 training images, or of the 24 left after a 20 % test split: round(2.4) = 2).
    for ids, y in ((got["train"], d.train_y), (got["val"], d.val_y)):
        assert [owner[i] for i in ids] == y.tolist()
    per_class = 3 if layout.startswith("train/") else 2
    assert torch.bincount(d.val_y).tolist() == [per_class] * 3
    assert d.describe()["num_val"] == 3 * per_class


def test_the_validation_split_moves_with_split_seed_only(tmp_path):
    from bonsai import data as data_mod

    numbered_folder(tmp_path, 30, "train")
    numbered_folder(tmp_path, 8, "test", start=100)
    cfg = folder_cfg(tmp_path)

    def val_ids(seed: int, **kw) -> list[int]:
        data_mod._CACHE.clear()
        seed_everything(seed)  # a run's `seed`: every global random stream reseeded
        d = load_data({**cfg, **kw})
        return sorted(splits(d)["val"])

    base = val_ids(0)
    assert val_ids(123) == base  # the run seed does not move it
    assert val_ids(0, max_train=12) == base  # nor does subsampling the training images
    moved = val_ids(0, split_seed=1)
    assert moved != base and len(moved) == len(base)
    data_mod._CACHE.clear()
    other = load_data({**cfg, "split_seed": 1})
    assert splits(other)["test"] == splits(load_data(cfg))["test"]  # test/ files: fixed
    # What was held out is part of the data: the digest covers all three splits.
    assert other.digest != load_data(cfg).digest
    assert load_data({**cfg, "val_size": 0.2}).digest != load_data(cfg).digest
    assert len(load_data({**cfg, "max_val": 3}).val_y) == 3


def test_generated_data_draws_its_validation_images_apart(synthetic):
    # num_train stays the number trained on; val_size x num_train more are drawn from a stream
    # of their own (split_seed + 3), one class after another like the training images.
    assert len(synthetic.train_y) == 256 and len(synthetic.val_y) == 26
    assert torch.bincount(synthetic.val_y).tolist() == [7, 7, 6, 6]
    again = load_data({"name": "synthetic", "split_seed": 1})
    assert not torch.equal(again.val_x, synthetic.val_x)


def test_training_statistics_leave_the_validation_images_out(digits):
    # Normalized by the training images' own mean and std: exactly 0 and 1 on them, not on
    # the held-out images.
    assert abs(float(digits.train_x.mean())) < 1e-4
    assert abs(float(digits.train_x.std()) - 1) < 1e-2
    assert abs(float(digits.val_x.mean())) > 1e-4


def test_a_validation_split_that_cannot_be_carved_is_refused(tmp_path):
    # From the config alone: synthetic classes take turns, so fewer than two per class.
    with pytest.raises(ValidationError, match=r"gives 3 validation image\(s\), fewer than the 4"):
        TypeAdapter(DataConfig).validate_python({"name": "synthetic", "num_train": 34})
    for size in (0, 1):
        with pytest.raises(ValidationError, match="val_size"):
            TypeAdapter(DataConfig).validate_python({"name": "digits", "val_size": size})
    # At load: a folder with a single training image per class has none to hold out.
    numbered_folder(tmp_path, 1, "train")
    numbered_folder(tmp_path, 2, "test", start=100)
    with pytest.raises(DataError, match=r"the validation split .* is empty.*at least two per"):
        load_data(folder_cfg(tmp_path))


# ---------------------------------------------------------------------------------------------
# The evaluator measures both; the comparison reports both deltas

CNN = {"name": "cnn", "width": 16, "depth": 2, "convs_per_stage": 1}


@pytest.fixture(scope="module")
def cnn(digits, tmp_path_factory):
    return run_stage(
        "train", {"model": CNN, "epochs": 6, "lr": 0.01}, digits, tmp_path_factory.mktemp("cnn")
    )


def relabelled(data, split: str):
    """`data` with the labels of one split shifted by one class: a good model's accuracy on it
    falls to about 0 while the other split's stays, so the two splits disagree."""
    y = getattr(data, f"{split}_y")
    return dataclasses.replace(data, **{f"{split}_y": (y + 1) % data.num_classes})


def test_the_evaluator_reports_test_accuracy_and_measures_validation_accuracy(
    digits, cnn, tmp_path
):
    onnx = run_stage("export.onnx", {}, digits, tmp_path / "onnx", input=cnn)
    wrong_val = relabelled(digits, "val")
    fast = {"warmup": 1, "repeats": 5, "footprint": False}
    evs = {a.kind: evaluate(a, wrong_val, tmp_path / a.kind, **fast) for a in (cnn, onnx)}
    for kind, ev in evs.items():
        m = ev.metrics
        assert m["accuracy"] > 90 and m["val_accuracy"] < 10, (kind, m)  # each its own labels
        assert len(ev.predictions) == len(digits.test_y)  # predictions: the test split's
    expected = top1(
        predict_logits(load_torch(cnn), digits.val_x).argmax(1).numpy(), wrong_val.val_y
    )
    assert evs["torch"].metrics["val_accuracy"] == pytest.approx(expected)
    variants = [
        Variant(n, a.kind, evs[a.kind].metrics, evs[a.kind].predictions, evs[a.kind].latency_model)
        for n, a in (("teacher", cnn), ("onnx", onnx))
    ]
    rows = compare(variants, "teacher", digits.test_x[:1].numpy(), rounds=1, per_round=2)
    onnx_row = rows[1]
    assert onnx_row["val_accuracy_delta"] == pytest.approx(
        evs["onnx"].metrics["val_accuracy"] - evs["torch"].metrics["val_accuracy"]
    )
    assert onnx_row["accuracy_delta"] == pytest.approx(
        evs["onnx"].metrics["accuracy"] - evs["torch"].metrics["accuracy"]
    )


# ---------------------------------------------------------------------------------------------
# Quantization decides on the validation split


@pytest.fixture(scope="module")
def outlier_onnx(digits, cnn, tmp_path_factory):
    """The CNN with an outlier channel (as in test_quantize.py): the same fp32 function, but
    all-int8 crushes the other channels of that tensor, so only keeping its two layers in float
    stays within a 2-point tolerance."""
    model = load_torch(cnn)
    with torch.no_grad():
        bn = model.features[-2]
        bn.weight[0] *= 200.0
        bn.bias[0] *= 200.0
        model.classifier.weight[:, 0] /= 200.0
    out = tmp_path_factory.mktemp("outlier")
    art = save_torch(model, out, cnn.meta["model"], data=cnn.meta["data"])
    return run_stage("export.onnx", {}, digits, tmp_path_factory.mktemp("o_onnx"), input=art)


def val_accuracy(path, data) -> float:
    return top1(run_logits(session(path), data.val_x).argmax(1), data.val_y.numpy())


def test_static_fallback_is_chosen_on_the_validation_split(digits, outlier_onnx, tmp_path):
    # Test labels scrambled: on the test split every variant is as bad as its parent (no drop),
    # so a gate reading the test split would take the all-int8 model. The fallback happens.
    data = relabelled(digits, "test")
    art = run_stage("quantize.static", {"tolerance": 2.0}, data, tmp_path / "q", input=outlier_onnx)
    meta = art.meta
    assert meta["float_layers"] == ["features.4", "classifier"]
    # The manifest's decision numbers are the validation split's ...
    parent = val_accuracy(outlier_onnx.file, data)
    assert meta["parent_val_accuracy"] == pytest.approx(parent)
    assert meta["fallback_steps"][-1]["accuracy"] == pytest.approx(val_accuracy(art.file, data))
    assert meta["val_accuracy_drop"] == pytest.approx(parent - val_accuracy(art.file, data))
    assert meta["num_val"] == len(data.val_y)
    assert parent - meta["int8_all_layers_accuracy"] > 10
    # ... and what it reports is the test split's.
    test_parent = top1(run_logits(session(outlier_onnx.file), data.test_x).argmax(1), data.test_y)
    assert meta["parent_accuracy"] == pytest.approx(test_parent) and test_parent < 10


def test_static_gate_ignores_a_drop_on_the_test_split(digits, outlier_onnx, tmp_path):
    # Validation labels scrambled: parent and all-int8 are equally wrong there, so the gate
    # passes the all-int8 model although it drops far more than 2 points on the test split.
    data = relabelled(digits, "val")
    art = run_stage("quantize.static", {"tolerance": 2.0}, data, tmp_path / "q", input=outlier_onnx)
    assert art.meta["float_layers"] == []
    assert art.meta["val_accuracy_drop"] <= 2.0
    assert art.meta["accuracy_drop"] > 10  # reported, not decided on


def test_the_shared_gate_checks_the_validation_split_and_prints_both(digits):
    c = get_stage("quantize.fp16").Config.model_validate({"tolerance": 2.0})
    ctx = SimpleNamespace(data=digits)
    eye = {
        s: np.eye(10, dtype=np.float32)[getattr(digits, f"{s}_y").numpy()] for s in ("val", "test")
    }
    wrong = {s: np.roll(v, 1, axis=1) for s, v in eye.items()}
    # Right on validation, wrong on test: passes, and reports the test split's drop.
    got = accuracy_check(c, eye, {"val": eye["val"], "test": wrong["test"]}, ctx, "fp16")
    assert got["val_accuracy_drop"] == 0 and got["accuracy_drop"] == pytest.approx(100)
    assert got["parent_accuracy"] == pytest.approx(100) and got["accuracy"] == 0
    # Wrong on validation, right on test: fails, naming the split and both splits' numbers.
    with pytest.raises(GateError) as e:
        accuracy_check(c, eye, {"val": wrong["val"], "test": eye["test"]}, ctx, "fp16")
    assert str(e.value).startswith(
        f"fp16 accuracy 0.00% vs 100.00% for its fp32 parent on the {len(digits.val_y)} "
        "validation images: a drop of 100.00 points, above tolerance=2 points (the test "
        "split, which only reports: 100.00% vs 100.00%)"
    )
