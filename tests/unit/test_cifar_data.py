"""Decoded 8-bit test images stay reachable raw (what a served model takes), images are decoded
once (cached), and the cifar10_jpeg preset points at the shared CIFAR-10 JPEG copy."""

import numpy as np
import torch
from PIL import Image

from bonsai import data as data_mod
from bonsai.data import load_data


def _folder(root, per_class=6, size=12, seed=0):
    rng = np.random.default_rng(seed)
    pixels = {}
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                a = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.png")
                pixels[(split, c, i)] = a
    return pixels


def test_imagefolder_keeps_the_raw_uint8_test_images_and_preprocess_reproduces_the_inputs(
    tmp_path,
):
    pixels = _folder(tmp_path)
    d = load_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 12})
    assert d.raw_format == {"layout": "NHWC", "dtype": "uint8", "divide_by": 255.0}
    assert d.raw_test.dtype == np.uint8 and d.raw_test.shape == (4, 12, 12, 3)
    # The raw images are the files' pixels, labels aligned: test is cat 0..1, dog 0..1.
    np.testing.assert_array_equal(d.raw_test[3], pixels[("test", "dog", 1)])
    # ...and what a served model computes from them is exactly what the evaluator measured on.
    x = data_mod.preprocess(d.raw_test, d.raw_format, d.mean, d.std)
    np.testing.assert_allclose(x, d.test_x.numpy(), atol=1e-6, rtol=0)


def test_subsampling_keeps_raw_and_normalized_aligned(tmp_path):
    _folder(tmp_path, per_class=10)
    d = load_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 12, "max_test": 2})
    assert d.raw_test.shape[0] == d.test_x.shape[0] == 2  # of 4
    x = data_mod.preprocess(d.raw_test, d.raw_format, d.mean, d.std)
    np.testing.assert_allclose(x, d.test_x.numpy(), atol=1e-6, rtol=0)


def test_images_are_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    _folder(tmp_path / "imgs")
    cfg = {
        "name": "imagefolder",
        "root": str(tmp_path / "imgs"),
        "image_size": 12,
        "cache_dir": str(tmp_path / "cache"),
    }
    first = load_data(cfg)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # train and test listings
    data_mod._CACHE.clear()  # as a new process would start

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_mod, "_decode", no_decoding)
    again = load_data(cfg)
    assert torch.equal(again.train_x, first.train_x) and again.digest == first.digest


def test_cifar10_jpeg_preset_points_at_the_shared_copy(tmp_path, monkeypatch):
    from flows.compress import compose_config

    # No machine's path: ../shared/data/cifar10 beside the checkout (the command runs in it)...
    monkeypatch.delenv("BONSAI_CIFAR10_ROOT", raising=False)
    raw = compose_config(["data=cifar10_jpeg", f"tracking.store_dir={tmp_path}"])
    assert raw["data"]["name"] == "imagefolder"
    assert raw["data"]["root"] == "../shared/data/cifar10"
    # ...or where the environment says.
    monkeypatch.setenv("BONSAI_CIFAR10_ROOT", str(tmp_path / "copy"))
    moved = compose_config(["data=cifar10_jpeg", f"tracking.store_dir={tmp_path}"])
    assert moved["data"]["root"] == str(tmp_path / "copy")
    assert raw["data"]["image_size"] == 32 and raw["data"]["channels"] == 3
    assert raw["data"]["cache_dir"] == f"{tmp_path}/cache"
    other = compose_config(["data=cifar10_jpeg", "data.root=/elsewhere/cifar10"])
    assert other["data"]["root"] == "/elsewhere/cifar10"
