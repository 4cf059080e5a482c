"""Datasets as in-memory tensors, with a digest for lineage and caching.

Every loader returns a `DataBundle`: normalized float32 images `[N, C, H, W]`, int64 labels, the
class names and the per-channel mean/std used to normalize (a deployed model expects inputs
normalized the same way). Images are decoded once and kept in memory: the datasets Bonsai targets
(digits, CIFAR, MNIST, a user's folder of small images) fit, and decoding JPEGs per epoch costs
more than training on them (STACK_NOTES).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from bonsai.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class _DataBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Seed of the train/test split and of any subsampling. Separate from the run's `seed`, so a
    # new training seed never changes which images are held out.
    split_seed: int = Field(default=0, ge=0, strict=True)
    # Keep at most this many train / test images (stratified), e.g. for a quick debug run.
    max_train: int | None = Field(default=None, gt=0)
    max_test: int | None = Field(default=None, gt=0)


class DigitsData(_DataBase):
    """sklearn's 8x8 handwritten digits (1,797 images, 10 classes); ships with scikit-learn."""

    name: Literal["digits"] = "digits"
    test_size: float = Field(default=0.2, gt=0, lt=1)


class SyntheticData(_DataBase):
    """Generated oriented gratings plus noise, one orientation per class: learnable in seconds,
    for tests and smoke runs."""

    name: Literal["synthetic"] = "synthetic"
    num_classes: int = Field(default=4, ge=2)
    num_train: int = Field(default=256, gt=0)
    num_test: int = Field(default=128, gt=0)
    channels: int = Field(default=1, ge=1)
    image_size: int = Field(default=8, ge=4)
    noise: float = Field(default=0.3, ge=0)


class ImageFolderData(_DataBase):
    """A folder of images, one sub-folder per class.

    Either `root/train/<class>/*` and `root/test/<class>/*`, or `root/<class>/*` split into train
    and test by `test_size` (stratified, seeded by `split_seed`).
    """

    name: Literal["imagefolder"] = "imagefolder"
    root: str
    image_size: int = Field(default=32, ge=4)
    channels: Literal[1, 3] = 3
    test_size: float = Field(default=0.2, gt=0, lt=1)
    # Refuse a dataset whose largest class has more than this many times the images of its
    # smallest: a model trained on it learns the class prior, and accuracy hides it.
    max_imbalance: float = Field(default=10.0, ge=1)
    # Decoded images are cached here (an .npz per folder listing); None disables the cache.
    cache_dir: str | None = None


class TorchvisionData(_DataBase):
    """CIFAR-10, MNIST or Fashion-MNIST through torchvision.

    `download: true` fetches the files when they are missing (needs internet); offline, the files
    must already be under `root`.
    """

    name: Literal["cifar10", "mnist", "fashion_mnist"]
    root: str
    download: bool = False


DataConfig = Annotated[
    DigitsData | SyntheticData | ImageFolderData | TorchvisionData, Field(discriminator="name")
]


@dataclass(frozen=True, eq=False)
class DataBundle:
    train_x: torch.Tensor  # float32 [N, C, H, W], normalized
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # float32 [M, C, H, W], normalized
    test_y: torch.Tensor  # int64 [M]
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the raw [0, 1] images
    std: tuple[float, ...]
    digest: str = field(default="")
    # The images as the data set stores them, uint8 [N, C, H, W] (0..255), for sources of 8-bit
    # images (image folders, torchvision's CIFAR/MNIST): train_x == (train_raw / 255 - mean) / std.
    # What a served model receives; None for digits and synthetic data (not 8-bit images).
    train_raw: torch.Tensor | None = field(default=None, repr=False)
    test_raw: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def describe(self) -> dict:
        return {
            "num_train": int(self.train_x.shape[0]),
            "num_test": int(self.test_x.shape[0]),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "digest": self.digest,
        }


# ---------------------------------------------------------------------------------------------
# Loading


_CACHE: dict[str, DataBundle] = {}
_CACHE_LOCK = threading.Lock()


def load_data(cfg: DataConfig | dict) -> DataBundle:
    """Load (once per process) and normalize the dataset described by `cfg`."""
    if isinstance(cfg, dict):
        from pydantic import TypeAdapter

        cfg = TypeAdapter(DataConfig).validate_python(cfg)
    key = cfg.model_dump_json()
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        bundle = _load(cfg)
        _CACHE[key] = bundle
        return bundle


def _load(cfg) -> DataBundle:
    if isinstance(cfg, DigitsData):
        xtr, ytr, xte, yte, classes = _load_digits(cfg)
    elif isinstance(cfg, SyntheticData):
        xtr, ytr, xte, yte, classes = _load_synthetic(cfg)
    elif isinstance(cfg, ImageFolderData):
        xtr, ytr, xte, yte, classes = _load_imagefolder(cfg)
    else:
        xtr, ytr, xte, yte, classes = _load_torchvision(cfg)
    xtr, ytr = _subsample(xtr, ytr, cfg.max_train, cfg.split_seed)
    xte, yte = _subsample(xte, yte, cfg.max_test, cfg.split_seed + 1)
    return _bundle(cfg, xtr, ytr, xte, yte, classes)


def _bundle(cfg, xtr, ytr, xte, yte, classes) -> DataBundle:
    """NCHW arrays -> normalized tensors, with a digest of the exact data.

    Images come as float [0, 1], or as uint8 0..255 (8-bit sources), which are kept as the
    bundle's `train_raw`/`test_raw` and scaled by 1/255 here.
    """
    if len(xtr) == 0 or len(xte) == 0:
        raise DataError(
            f"dataset {cfg.name!r} has {len(xtr)} train and {len(xte)} test images; "
            "both splits need at least one (check the data root and max_train/max_test)"
        )
    labels = set(np.unique(ytr).tolist())
    if len(labels) < 2:
        raise DataError(
            f"dataset {cfg.name!r}: the training split has {len(labels)} class; a classifier "
            "needs at least 2"
        )
    raw = None
    if xtr.dtype == np.uint8 and xte.dtype == np.uint8:
        raw = (
            torch.from_numpy(np.ascontiguousarray(xtr)),
            torch.from_numpy(np.ascontiguousarray(xte)),
        )
        xtr = xtr.astype(np.float32) / np.float32(255.0)
        xte = xte.astype(np.float32) / np.float32(255.0)
    xtr = np.ascontiguousarray(xtr, dtype=np.float32)
    xte = np.ascontiguousarray(xte, dtype=np.float32)
    h = hashlib.sha256()
    h.update(json.dumps({"name": cfg.name, "classes": list(classes)}).encode())
    for a in (xtr, ytr.astype(np.int64), xte, yte.astype(np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    mean = xtr.mean(axis=(0, 2, 3))
    std = xtr.std(axis=(0, 2, 3)) + 1e-6
    norm = lambda a: (a - mean[None, :, None, None]) / std[None, :, None, None]  # noqa: E731
    return DataBundle(
        train_x=torch.from_numpy(norm(xtr).astype(np.float32)),
        train_y=torch.from_numpy(ytr.astype(np.int64)),
        test_x=torch.from_numpy(norm(xte).astype(np.float32)),
        test_y=torch.from_numpy(yte.astype(np.int64)),
        classes=tuple(classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        digest=h.hexdigest()[:16],
        train_raw=raw[0] if raw else None,
        test_raw=raw[1] if raw else None,
    )


def _split(x, y, test_size, seed):
    """Stratified split: `test_size` of every class (at least one image of each class with two
    or more) goes to the test split, chosen by a seeded permutation."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(members) * test_size))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test_idx.extend(members[:n_test].tolist())
    test = np.zeros(len(y), dtype=bool)
    test[test_idx] = True
    return x[~test], x[test], y[~test], y[test]


def _subsample(x, y, n, seed):
    if n is None or n >= len(x):
        return x, y
    rng = np.random.default_rng(seed)
    # Stratified: the same share of every class, so a small debug subset keeps every label.
    idx = []
    classes = np.unique(y)
    per_class = max(1, n // len(classes))
    for c in classes:
        members = np.flatnonzero(y == c)
        idx.extend(rng.permutation(members)[:per_class].tolist())
    idx = np.sort(np.array(idx[:n] if len(idx) > n else idx))
    return x[idx], y[idx]


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as ([1797, 8, 8] pixel values 0..16, labels), read from the CSV file that
    scikit-learn ships (importing sklearn itself costs ~1 s of every run's start-up)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            a = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return a[:, :64].reshape(-1, 8, 8), a[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _load_digits(cfg: DigitsData):
    images, y = _digits_arrays()
    x = (images / 16.0)[:, None, :, :]  # [1797, 1, 8, 8] in [0, 1]
    xtr, xte, ytr, yte = _split(x, y, cfg.test_size, cfg.split_seed)
    return xtr, ytr, xte, yte, [str(i) for i in range(10)]


def _load_synthetic(cfg: SyntheticData):
    """Class k: a sinusoidal grating at orientation k*pi/K with a random phase per image, plus
    Gaussian noise. Orientation is what a CNN must learn; phase makes position useless."""
    size, k = cfg.image_size, cfg.num_classes
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    freq = 2 * np.pi / max(3.0, size / 2)  # about two periods across the image

    def make(n, r):
        y = np.arange(n) % k
        r.shuffle(y)
        theta = np.pi * y / k
        phase = r.uniform(0, 2 * np.pi, size=n)
        proj = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy
        img = 0.5 + 0.4 * np.sin(freq * proj + phase[:, None, None])  # [n, H, W] in [0.1, 0.9]
        x = np.repeat(img[:, None], cfg.channels, axis=1)
        x = x + cfg.noise * r.standard_normal(x.shape)
        return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)

    xtr, ytr = make(cfg.num_train, np.random.default_rng(cfg.split_seed + 1))
    xte, yte = make(cfg.num_test, np.random.default_rng(cfg.split_seed + 2))
    return xtr, ytr, xte, yte, [f"class_{i}" for i in range(k)]


def _list_class_folders(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist or is not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"no class folders in {str(root)!r}: expected {root}/<class>/<image> "
            f"(or {root}/train/<class>/ and {root}/test/<class>/)"
        )
    out = {}
    for c in classes:
        files = sorted(
            p for p in c.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(
                f"class folder {str(c)!r} holds no images (extensions: "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add images"
            )
        out[c.name] = files
    return out


def _check_balance(split: dict[str, list[Path]], where: Path, max_imbalance: float) -> None:
    sizes = {c: len(f) for c, f in split.items()}
    big, small = max(sizes, key=lambda c: sizes[c]), min(sizes, key=lambda c: sizes[c])
    if sizes[big] > max_imbalance * sizes[small]:
        raise DataError(
            f"classes in {str(where)!r} are unbalanced: {big!r} has {sizes[big]} images, "
            f"{small!r} has {sizes[small]} (ratio {sizes[big] / sizes[small]:.1f} > "
            f"data.max_imbalance={max_imbalance}); add images to the small classes or raise "
            "data.max_imbalance"
        )


def _decode(files: list[Path], cfg: ImageFolderData) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    mode = "L" if cfg.channels == 1 else "RGB"
    out = np.empty((len(files), cfg.image_size, cfg.image_size, cfg.channels), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as opened:
                im = opened.convert(mode)
                if im.size != (cfg.image_size, cfg.image_size):
                    im = im.resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(
                f"cannot read image {str(f)!r} ({e.__class__.__name__}: {e}); "
                "remove or replace the file"
            ) from e
        out[i] = a.reshape(cfg.image_size, cfg.image_size, cfg.channels)
    return out


def _load_imagefolder(cfg: ImageFolderData):
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root {cfg.root!r} does not exist; point data.root at a folder of class "
            "sub-folders (or with train/ and test/ sub-folders)"
        )
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    if has_splits:
        train = _list_class_folders(root / "train")
        test = _list_class_folders(root / "test")
        if set(train) != set(test):
            raise DataError(
                f"train and test class folders differ under {str(root)!r}: only in train "
                f"{sorted(set(train) - set(test))}, only in test {sorted(set(test) - set(train))}"
            )
        _check_balance(train, root / "train", cfg.max_imbalance)
    else:
        train, test = _list_class_folders(root), None
        _check_balance(train, root, cfg.max_imbalance)
    classes = sorted(train)

    def flat(split):
        files = [f for c in classes for f in split[c]]
        labels = np.array([i for i, c in enumerate(classes) for _ in split[c]], dtype=np.int64)
        return files, labels

    def decoded(files):  # uint8 [N, C, H, W]: `_bundle` keeps them raw and scales a copy
        return _cached_decode(files, cfg)

    ftr, ytr = flat(train)
    xtr = decoded(ftr)
    if test is None:
        xtr, xte, ytr, yte = _split(xtr, ytr, cfg.test_size, cfg.split_seed)
    else:
        fte, yte = flat(test)
        xte = decoded(fte)
    return xtr, ytr, xte, yte, classes


def _cached_decode(files: list[Path], cfg: ImageFolderData) -> np.ndarray:
    """Decoded NCHW uint8 images, cached on disk keyed by the file listing (paths, sizes, mtimes)."""
    if cfg.cache_dir is None:
        return _decode(files, cfg).transpose(0, 3, 1, 2)
    h = hashlib.sha256(f"{cfg.image_size}:{cfg.channels}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    path = Path(cfg.cache_dir) / f"imagefolder-{h.hexdigest()[:20]}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (len(files), cfg.channels, cfg.image_size, cfg.image_size):
                return arr
        except (OSError, ValueError):
            pass  # a corrupt cache file is rebuilt below
    arr = np.ascontiguousarray(_decode(files, cfg).transpose(0, 3, 1, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{threading.get_ident()}.npy")
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(path)
    return arr


_TORCHVISION = {
    # name: (torchvision class, folder the files must be in, relative to root)
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw"),
}


def _load_torchvision(cfg: TorchvisionData):
    import torchvision

    cls_name, sub = _TORCHVISION[cfg.name]
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(cfg.root).expanduser()
    try:
        tr = cls(str(root), train=True, download=cfg.download)
        te = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as e:
        raise DataError(
            f"{cfg.name} files not found under {str(root / sub)!r} ({e}). Put the dataset there, "
            f"or set data.download=true on a machine with internet access"
        ) from e

    def arrays(ds):
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> NCHW, uint8
        return np.ascontiguousarray(x, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)

    xtr, ytr = arrays(tr)
    xte, yte = arrays(te)
    return xtr, ytr, xte, yte, list(tr.classes)
