from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonsai.data import load_data
from bonsai.errors import DataError


def _write_images(folder, classes, per_class, size=12, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for c, n in zip(classes, per_class, strict=True):
        d = folder / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(a).convert(mode).save(d / f"{i}.png")


def test_digits_split_is_stratified_and_fixed_by_split_seed(digits):
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    # Every image in exactly one split: the validation split comes out of the training images.
    assert len(digits.train_x) + len(digits.val_x) + len(digits.test_x) == 1797
    # Every class is in the test split at about its overall share (stratified 20 %).
    counts = torch.bincount(digits.test_y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    again = load_data({"name": "digits", "split_seed": 0, "test_size": 0.2})
    other = load_data({"name": "digits", "split_seed": 1})
    assert again.digest == digits.digest
    assert other.digest != digits.digest


def test_normalization_uses_train_statistics(digits):
    assert abs(float(digits.train_x.mean())) < 1e-4
    assert abs(float(digits.train_x.std()) - 1) < 1e-2
    assert digits.mean[0] > 0 and digits.std[0] > 0


def test_max_train_keeps_every_class(digits):
    small = load_data({"name": "digits", "max_train": 50, "max_test": 30})
    assert len(small.train_x) == 50
    assert set(small.train_y.tolist()) == set(range(10))
    assert small.digest != digits.digest


def test_synthetic_is_deterministic_and_learnable_shape(synthetic):
    assert synthetic.input_shape == (1, 8, 8)
    assert synthetic.num_classes == 4
    cfg = {"name": "synthetic", "num_classes": 4, "num_train": 256, "num_test": 128}
    # Cached per process (a test that clears the cache may have run since the fixture loaded).
    again = load_data(cfg)
    assert load_data(dict(cfg)) is again
    assert torch.equal(again.train_x, synthetic.train_x)  # and deterministic


def test_imagefolder_with_train_and_test_splits(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog"], [6, 6])
    _write_images(tmp_path / "test", ["cat", "dog"], [2, 3], seed=1)
    d = load_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 8})
    assert d.classes == ("cat", "dog")
    # 6 training images per class: one of each held out as the validation split (val_size 0.1,
    # at least one per class).
    assert d.train_x.shape == (10, 3, 8, 8) and d.val_y.tolist() == [0, 1]
    assert d.test_x.shape == (5, 3, 8, 8)
    assert d.test_y.tolist() == [0, 0, 1, 1, 1]


def test_imagefolder_single_folder_is_split_and_cached(tmp_path):
    _write_images(tmp_path / "imgs", ["a", "b", "c"], [10, 10, 10])
    cache = tmp_path / "cache"
    cfg = {
        "name": "imagefolder",
        "root": str(tmp_path / "imgs"),
        "image_size": 8,
        "channels": 1,
        "test_size": 0.3,
        "cache_dir": str(cache),
    }
    d = load_data(cfg)
    assert d.train_x.shape[1:] == (1, 8, 8)
    # 7 of each class's 10 left after the test split; one of them held out for validation.
    assert len(d.train_x) == 18 and len(d.val_x) == 3 and len(d.test_x) == 9
    assert len(list(cache.glob("*.npy"))) == 1
    # A second load in a fresh process would read the cache: same digest from the cached array.
    from bonsai import data as data_mod

    data_mod._CACHE.clear()
    assert load_data(cfg).digest == d.digest


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class folders"),
        (
            lambda root: ((root / "a").mkdir(parents=True), _write_images(root, ["b"], [3])),
            "holds no images",
        ),
        (lambda root: _write_images(root, ["big", "small"], [22, 2]), "unbalanced"),
    ],
    ids=["missing-root", "no-classes", "empty-class", "unbalanced"],
)
def test_imagefolder_errors_name_the_problem(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_data({"name": "imagefolder", "root": str(root), "image_size": 8})


def test_unreadable_image_is_named(tmp_path):
    _write_images(tmp_path, ["a", "b"], [3, 3])
    bad = tmp_path / "b" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="broken.jpg"):
        load_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 8})


def test_train_and_test_classes_must_match(tmp_path):
    _write_images(tmp_path / "train", ["a", "b"], [3, 3])
    _write_images(tmp_path / "test", ["a", "c"], [2, 2])
    with pytest.raises(DataError, match="only in train \\['b'\\], only in test \\['c'\\]"):
        load_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 8})


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST/raw")]
)
def test_torchvision_offline_missing_files_names_expected_path(tmp_path, name, folder):
    with pytest.raises(DataError) as e:
        load_data({"name": name, "root": str(tmp_path), "download": False})
    assert str(tmp_path / folder) in str(e.value)
    assert "data.download=true" in str(e.value)


CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10 (CIFAR-10 as JPEG)")
def test_real_cifar10_imagefolder_loads_whole():
    d = load_data({"name": "imagefolder", "root": str(CIFAR), "image_size": 32})
    assert d.classes[:2] == ("airplane", "automobile") and d.num_classes == 10
    # 500 of each class's 5,000 training images are the validation split (val_size 0.1).
    assert d.train_x.shape == (45000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(d.val_y).tolist() == [500] * 10
    assert torch.bincount(d.test_y).tolist() == [1000] * 10
    # Per-channel means of the raw images match CIFAR-10's published 125.3/122.9/113.9 (of 255).
    np.testing.assert_allclose(np.array(d.mean) * 255, [125.3, 122.9, 113.9], atol=1.0)
