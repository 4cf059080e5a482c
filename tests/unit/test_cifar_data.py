"""Decoded 8-bit images stay reachable raw, are decoded once (cached), and the cifar10_jpeg
preset points at the shared CIFAR-10 JPEG copy."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonsai import data as data_mod
from bonsai.data import load_data

CIFAR = Path("/work/shared/data/cifar10")


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


def test_imagefolder_keeps_the_raw_uint8_images_beside_the_normalized_ones(tmp_path):
    pixels = _folder(tmp_path)
    d = load_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 12})
    assert d.train_raw is not None and d.test_raw is not None
    assert d.train_raw.dtype == torch.uint8 and d.train_raw.shape == (12, 3, 12, 12)
    assert d.test_raw.shape == (4, 3, 12, 12)
    # The raw images are the files' pixels (NCHW), labels aligned: train is cat 0..5, dog 0..5.
    np.testing.assert_array_equal(
        d.train_raw[7].permute(1, 2, 0).numpy(), pixels[("train", "dog", 1)]
    )
    # ...and the normalized tensors are exactly (raw / 255 - mean) / std.
    mean, std = torch.tensor(d.mean)[:, None, None], torch.tensor(d.std)[:, None, None]
    torch.testing.assert_close(d.train_x, (d.train_raw / 255.0 - mean) / std, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.test_x, (d.test_raw / 255.0 - mean) / std, atol=1e-5, rtol=0)


def test_subsampling_keeps_raw_and_normalized_aligned(tmp_path):
    _folder(tmp_path, per_class=10)
    d = load_data({"name": "imagefolder", "root": str(tmp_path), "image_size": 12, "max_train": 6})
    assert d.train_raw.shape[0] == d.train_x.shape[0] == 6
    mean, std = torch.tensor(d.mean)[:, None, None], torch.tensor(d.std)[:, None, None]
    torch.testing.assert_close(d.train_x, (d.train_raw / 255.0 - mean) / std, atol=1e-5, rtol=0)


def test_non_8bit_sources_have_no_raw_images(digits, synthetic):
    assert digits.train_raw is None and synthetic.test_raw is None


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
    assert torch.equal(again.train_raw, first.train_raw) and again.digest == first.digest


def test_cifar10_jpeg_preset_points_at_the_shared_copy(tmp_path):
    from flows.compress import compose_config

    raw = compose_config(["data=cifar10_jpeg", f"tracking.store_dir={tmp_path}"])
    assert raw["data"]["name"] == "imagefolder"
    assert raw["data"]["root"] == str(CIFAR)
    assert raw["data"]["image_size"] == 32 and raw["data"]["channels"] == 3
    assert raw["data"]["cache_dir"] == f"{tmp_path}/cache"
    other = compose_config(["data=cifar10_jpeg", "data.root=/elsewhere/cifar10"])
    assert other["data"]["root"] == "/elsewhere/cifar10"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs the shared CIFAR-10 JPEG copy")
def test_real_cifar10_jpeg_decodes_once_and_keeps_raw_uint8(tmp_path, monkeypatch):
    from flows.compress import compose_config

    cfg = compose_config(["data=cifar10_jpeg", f"tracking.store_dir={tmp_path}"])["data"]
    d = load_data(cfg)
    assert d.train_raw.shape == (50000, 3, 32, 32) and d.train_raw.dtype == torch.uint8
    assert d.test_raw.shape == (10000, 3, 32, 32)
    np.testing.assert_allclose(
        d.train_raw.float().mean(dim=(0, 2, 3)).numpy(), [125.3, 122.9, 113.9], atol=1.0
    )
    data_mod._CACHE.clear()
    monkeypatch.setattr(data_mod, "_decode", lambda *a, **k: pytest.fail("decoded twice"))
    assert load_data(cfg).digest == d.digest
