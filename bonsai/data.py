"""Datasets as in-memory tensors, with a digest for lineage and caching.

Every loader returns a `DataBundle`: normalized float32 images `[N, C, H, W]` and int64 labels
of three disjoint splits (train, validation, test), the class names and the per-channel mean/std used to normalize (a deployed model expects inputs
normalized the same way). Images are decoded once and kept in memory: the datasets Bonsai targets
(digits, CIFAR, MNIST, a user's folder of small images) fit, and decoding JPEGs per epoch costs
more than training on them (measured on the 2-core reference machine).

The splits. The test split is the data set's own (its test files, or `test_size` of every class
carved out by `split_seed`); it only reports. The validation split (`val_size` of every class,
default 10 %, stratified and seeded by `split_seed`, never by the run's `seed`) is carved out of
the remaining training images before `max_train` subsamples them, so it is the same images
whatever `max_train` is (generated data draws its own: `SyntheticData.num_val`); `max_val` caps
it the way `max_train` and `max_test` cap theirs. Every decision Bonsai makes from accuracy (a
quantization stage's tolerance gate and its float-layer fallback, promotion's constraints and
objective, and so the recipe search) is made on the validation split; the test split's numbers
are the ones reported. The model trains on what is left, and normalization statistics come
from those training images only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bonsai.errors import DataError
from bonsai.heads import HeadConfig, Heads, check_head_list, resolve_heads

logger = logging.getLogger("bonsai.data")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class _DataBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Seed of the train/test split and of any subsampling. Separate from the run's `seed`, so a
    # new training seed never changes which images are held out.
    split_seed: int = Field(default=0, ge=0, strict=True)
    # Share of every class's training images held out as the validation split, on which every
    # accuracy-based decision is made (stratified; a class with two or more training images
    # gives at least one and keeps at least one). Carved out before `max_train` subsamples.
    val_size: float = Field(default=0.1, gt=0, lt=1)
    # Keep at most this many train / validation / test images (stratified), e.g. for a quick
    # debug run.
    max_train: int | None = Field(default=None, gt=0)
    max_val: int | None = Field(default=None, gt=0)
    max_test: int | None = Field(default=None, gt=0)
    # Multi-task: one head per task, its labels derived from the data's classes (bonsai/heads.py).
    # Empty: one task, the data's own classes.
    heads: list[HeadConfig] = []

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[HeadConfig]) -> list[HeadConfig]:
        return check_head_list(v)


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

    @property
    def num_val(self) -> int:
        """Validation images: generated like the training images, from a stream of their own
        (so `num_train` stays the number trained on), `val_size` x `num_train` of them."""
        return round(self.val_size * self.num_train)

    @model_validator(mode="after")
    def _room_for_validation(self) -> SyntheticData:
        # Classes take turns (image i is class i % num_classes): one validation image per class
        # needs at least num_classes of them.
        if self.num_val < self.num_classes:
            need = -(-self.num_classes // self.val_size)  # ceil: num_val >= num_classes
            raise ValueError(
                f"val_size={self.val_size:g} x num_train={self.num_train} gives {self.num_val} "
                f"validation image(s), fewer than the {self.num_classes} classes: the "
                f"validation split needs one of each; set data.num_train to at least "
                f"{int(need)} (or raise data.val_size)"
            )
        return self


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
    # Held out of the training images (`val_size`): what every accuracy-based decision uses.
    val_x: torch.Tensor  # float32 [V, C, H, W], normalized
    val_y: torch.Tensor  # int64 [V]
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the raw [0, 1] images
    std: tuple[float, ...]
    digest: str = field(default="")
    # The test images as the data set stores them (e.g. uint8 [M, H, W, C] for image files, the
    # 0..16 grid values [M, 8, 8] for digits), and how to turn them into `test_x`: what a served
    # model takes and does (`preprocess`).
    raw_test: np.ndarray = field(default_factory=lambda: np.zeros(0))
    raw_format: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the loader did that a user should know (skipped files)
    heads: Heads | None = None  # multi-task: the heads' labels, derived from `classes`
    # Image files: how a file became a raw image (`image_decoding`); empty for array data sets.
    decode: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_outputs(self) -> int:
        """Logit columns of a model for this data: the classes, or every head's labels."""
        return len(self.classes) if self.heads is None else self.heads.total

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
            "num_val": int(self.val_x.shape[0]),
            "num_test": int(self.test_x.shape[0]),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "digest": self.digest,
            "raw_format": self.raw_format,
            **({"decode": self.decode} if self.decode else {}),
            "notes": list(self.notes),
            **({"heads": self.heads.describe()} if self.heads is not None else {}),
        }


def expected_input(cfg: DataConfig) -> tuple[tuple[int, int, int], int] | None:
    """(input shape [C, H, W], logit columns: the class count, or every head's labels) from the
    config alone, without decoding any image (an image folder's classes are its sub-folders),
    so model and head checks can run before a long decode; None when only loading can tell.
    Raises ConfigError for heads that do not fit the classes."""
    got = expected_classes(cfg)
    if got is None:
        return None
    shape, classes = got
    heads = resolve_heads(cfg.heads, classes)
    return shape, len(classes) if heads is None else heads.total


def data_set_name(cfg: DataConfig) -> str:
    """The data set's name, as registered models are named after it (bonsai-<name>-<policy>):
    an image folder's own folder name (`data.root=/data/letters` -> `letters`), so that two
    folders do not compete for one champion; otherwise `data.name` (digits, cifar10, ...).
    Characters MLflow or a URI would trip on become '-'."""
    if not isinstance(cfg, ImageFolderData):
        return cfg.name
    folder = Path(cfg.root).expanduser().resolve().name  # resolved: "." and "x/.." name a folder
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", folder).strip("-.") or cfg.name


_TORCHVISION_CLASSES = {
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ),
    "mnist": tuple(f"{i} - {n}" for i, n in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )),
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
        "Bag", "Ankle boot",
    ),
}  # fmt: skip


def expected_classes(cfg: DataConfig) -> tuple[tuple[int, int, int], tuple[str, ...]] | None:
    """(input shape, class names) from the config alone; None when only loading can tell."""
    if isinstance(cfg, DigitsData):
        return (1, 8, 8), tuple(str(i) for i in range(10))
    if isinstance(cfg, SyntheticData):
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        return shape, tuple(f"class_{i}" for i in range(cfg.num_classes))
    if isinstance(cfg, TorchvisionData):
        shape = (3, 32, 32) if cfg.name == "cifar10" else (1, 28, 28)
        return shape, _TORCHVISION_CLASSES[cfg.name]
    root = Path(cfg.root).expanduser()
    root = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
    if not root.is_dir():
        return None
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        return None
    return (cfg.channels, cfg.image_size, cfg.image_size), tuple(classes)


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


# How raw images become model inputs. `layout` is the raw array's axis order, `divide_by` maps
# its values to [0, 1]; `preprocess` then normalizes per channel. Loading and serving both call
# `preprocess`, so a served model computes exactly what the evaluator measured.
RAW_LAYOUTS = ("NHW", "NHWC", "NCHW")


def to_unit(raw: np.ndarray, fmt: dict) -> np.ndarray:
    """Raw images -> float32 NCHW in [0, 1]."""
    x = np.asarray(raw).astype(np.float32) / np.float32(fmt["divide_by"])
    if fmt["layout"] == "NHW":
        x = x[:, None]
    elif fmt["layout"] == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """Float32 NCHW in [0, 1] -> the normalized inputs models are trained on."""
    m = np.asarray(mean, dtype=np.float32)[None, :, None, None]
    s = np.asarray(std, dtype=np.float32)[None, :, None, None]
    return ((x - m) / s).astype(np.float32)


def preprocess(raw: np.ndarray, fmt: dict, mean, std) -> np.ndarray:
    """What a deployed model does to the images a user has: `to_unit`, then `normalize`."""
    return normalize(to_unit(raw, fmt), mean, std)


def _load(cfg) -> DataBundle:
    notes: list[str] = []
    decode: dict = {}
    if isinstance(cfg, DigitsData):
        rtr, ytr, rte, yte, classes, fmt = _load_digits(cfg)
    elif isinstance(cfg, SyntheticData):
        rtr, ytr, rte, yte, classes, fmt = _load_synthetic(cfg)
        generated = _synthetic(cfg, cfg.num_val, cfg.split_seed + 3)
    elif isinstance(cfg, ImageFolderData):
        rtr, ytr, rte, yte, classes, fmt = _load_imagefolder(cfg, notes)
        decode = image_decoding(cfg)
    else:
        rtr, ytr, rte, yte, classes, fmt = _load_torchvision(cfg)
    # The validation split comes out of the training images first, so that it does not move
    # with max_train (generated data: drawn apart, see SyntheticData.num_val); then each split
    # is capped on its own.
    if isinstance(cfg, SyntheticData):
        rva, yva = generated
    else:
        rtr, rva, ytr, yva = _split(rtr, ytr, cfg.val_size, _val_seed(cfg))
    rtr, ytr = _subsample(rtr, ytr, cfg.max_train, cfg.split_seed)
    rva, yva = _subsample(rva, yva, cfg.max_val, cfg.split_seed + 2)
    rte, yte = _subsample(rte, yte, cfg.max_test, cfg.split_seed + 1)
    for note in notes:
        logger.warning(f"data: {note}")
    return _bundle(cfg, (rtr, ytr), (rva, yva), (rte, yte), classes, fmt, tuple(notes), decode)


def _val_seed(cfg) -> np.random.SeedSequence:
    """The validation split's own random stream: derived from `split_seed` only (a new run
    `seed` never moves it), and apart from the streams of the test split and subsampling."""
    return np.random.SeedSequence([cfg.split_seed, 0x7A1])


def _bundle(cfg, train, val, test, classes, fmt, notes=(), decode=None) -> DataBundle:
    """Raw (images, labels) of each split -> normalized float32 NCHW tensors, with a digest of
    the exact data."""
    (rtr, ytr), (rva, yva), (rte, yte) = train, val, test
    if len(rtr) == 0 or len(rte) == 0:
        raise DataError(
            f"dataset {cfg.name!r} has {len(rtr)} train and {len(rte)} test images; "
            "both splits need at least one (check the data root and max_train/max_test)"
        )
    if len(rva) == 0:
        raise _empty_val(cfg, len(rtr))
    labels = set(np.unique(ytr).tolist())
    if len(labels) < 2:
        raise DataError(
            f"dataset {cfg.name!r}: the training split has {len(labels)} class; a classifier "
            "needs at least 2"
        )
    heads = resolve_heads(cfg.heads, tuple(classes))
    xtr, xte = to_unit(rtr, fmt), to_unit(rte, fmt)
    h = hashlib.sha256()
    h.update(json.dumps({"name": cfg.name, "classes": list(classes)}).encode())
    if heads is not None:  # the same images with other labels are other data
        h.update(json.dumps(heads.describe()).encode())
    xva = to_unit(rva, fmt)
    # Which images are in which split is part of the data: the digest covers all three.
    for a in (xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), xva, yva.astype(np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    mean = xtr.mean(axis=(0, 2, 3))  # of the images trained on: not the validation split's
    std = xtr.std(axis=(0, 2, 3)) + 1e-6
    return DataBundle(
        train_x=torch.from_numpy(normalize(xtr, mean, std)),
        train_y=torch.from_numpy(ytr.astype(np.int64)),
        test_x=torch.from_numpy(normalize(xte, mean, std)),
        test_y=torch.from_numpy(yte.astype(np.int64)),
        val_x=torch.from_numpy(normalize(xva, mean, std)),
        val_y=torch.from_numpy(yva.astype(np.int64)),
        classes=tuple(classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        digest=h.hexdigest()[:16],
        raw_test=np.ascontiguousarray(rte),
        raw_format=dict(fmt),
        notes=tuple(notes),
        heads=heads,
        decode=dict(decode or {}),
    )


def _empty_val(cfg, num_train: int) -> DataError:
    return DataError(
        f"dataset {cfg.name!r}: the validation split (data.val_size={cfg.val_size:g} of the "
        f"{num_train} training images) is empty: no class has two training images to give "
        "one to it; add training images (at least two per class)"
    )


def _held_out(n: int, share: float) -> int:
    """How many of a class's `n` images `_split` holds out."""
    k = int(round(n * share))
    return min(max(k, 1), n - 1) if n >= 2 else k


def _split(x, y, test_size, seed):
    """Stratified split: `test_size` of every class (at least one image of each class with two
    or more, and never its last one) goes to the held-out split, chosen by a seeded
    permutation. (kept x, held-out x, kept y, held-out y), each in the input's order."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test_idx.extend(members[: _held_out(len(members), test_size)].tolist())
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
    images, y = _digits_arrays()  # [1797, 8, 8] grid values 0..16, as sklearn stores them
    xtr, xte, ytr, yte = _split(images.astype(np.float64), y, cfg.test_size, cfg.split_seed)
    fmt = {"layout": "NHW", "dtype": "float64", "divide_by": 16.0}
    return xtr, ytr, xte, yte, [str(i) for i in range(10)], fmt


def _load_synthetic(cfg: SyntheticData):
    xtr, ytr = _synthetic(cfg, cfg.num_train, cfg.split_seed + 1)
    xte, yte = _synthetic(cfg, cfg.num_test, cfg.split_seed + 2)
    fmt = {"layout": "NCHW", "dtype": "float32", "divide_by": 1.0}
    return xtr, ytr, xte, yte, [f"class_{i}" for i in range(cfg.num_classes)], fmt


def _synthetic(cfg: SyntheticData, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images and labels from the random stream `seed`. Class k: a sinusoidal grating at
    orientation k*pi/K with a random phase per image, plus Gaussian noise. Orientation is what a
    CNN must learn; phase makes position useless."""
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

    return make(n, np.random.default_rng(seed))


def _list_class_folders(root: Path, skipped: list[Path] | None = None) -> dict[str, list[Path]]:
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
        every = [p for p in c.rglob("*") if p.is_file()]
        files = sorted(p for p in every if p.suffix.lower() in IMAGE_EXTENSIONS)
        if skipped is not None:
            skipped += sorted(p for p in every if p.suffix.lower() not in IMAGE_EXTENSIONS)
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


# The one resize filter image files are decoded with: a Pillow `Image.Resampling` member, by
# its lower-case name. `image_decoding` records it and `_decode` uses it, so what a model file
# says about its inputs is what its evaluation decoded.
RESIZE_FILTER = "bilinear"


def image_decoding(cfg: ImageFolderData) -> dict:
    """How `_decode` turns an image file into a raw image, step by step, for whoever must feed a
    deployed model the same pixels: Pillow opens the file, converts it to `mode` (L: grayscale
    by ITU-R 601-2 luma, L = R*299/1000 + G*587/1000 + B*114/1000; RGB: a grayscale file's
    channel repeated), then, only when its size differs, resizes it to `size` (width, height)
    with `resize_filter`; the pixels are uint8 height x width x channels."""
    return {
        "reader": "Pillow",
        "mode": "L" if cfg.channels == 1 else "RGB",
        "size": [cfg.image_size, cfg.image_size],
        "resize_filter": RESIZE_FILTER,
        "order": "open, convert(mode), resize(size, resize_filter) if the size differs",
    }


def _decode(files: list[Path], cfg: ImageFolderData) -> tuple[np.ndarray, int]:
    """uint8 [N, size, size, channels], and how many images had another channel count."""
    from PIL import Image, UnidentifiedImageError

    how = image_decoding(cfg)
    mode, size = how["mode"], tuple(how["size"])
    resample = Image.Resampling[how["resize_filter"].upper()]
    out = np.empty((len(files), cfg.image_size, cfg.image_size, cfg.channels), dtype=np.uint8)
    converted = 0
    for i, f in enumerate(files):
        try:
            with Image.open(f) as opened:
                converted += len(opened.getbands()) != cfg.channels
                im = opened.convert(mode)
                if im.size != size:
                    im = im.resize(size, resample)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(
                f"cannot read image {str(f)!r} ({e.__class__.__name__}: {e}); "
                "remove or replace the file"
            ) from e
        out[i] = a.reshape(cfg.image_size, cfg.image_size, cfg.channels)
    return out, converted


def _load_imagefolder(cfg: ImageFolderData, notes: list[str]):
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root {cfg.root!r} does not exist; point data.root at a folder of class "
            "sub-folders (or with train/ and test/ sub-folders)"
        )
    skipped: list[Path] = []
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    if has_splits:
        train = _list_class_folders(root / "train", skipped)
        test = _list_class_folders(root / "test", skipped)
        if set(train) != set(test):
            raise DataError(
                f"train and test class folders differ under {str(root)!r}: only in train "
                f"{sorted(set(train) - set(test))}, only in test {sorted(set(test) - set(train))}"
            )
        _check_balance(train, root / "train", cfg.max_imbalance)
    else:
        train, test = _list_class_folders(root, skipped), None
        _check_balance(train, root, cfg.max_imbalance)
    classes = sorted(train)
    # Before decoding (and caching) anything: each class's training images, after the test
    # split, must leave the validation split one.
    left = [
        len(f) - (0 if has_splits else _held_out(len(f), cfg.test_size)) for f in train.values()
    ]
    if max(left) < 2:
        raise _empty_val(cfg, sum(left))
    if skipped:
        notes.append(
            f"skipped {len(skipped)} file(s) that are not images (extensions: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}), e.g. {str(skipped[0].relative_to(root))!r}"
        )

    def flat(split):
        files = [f for c in classes for f in split[c]]
        labels = np.array([i for i, c in enumerate(classes) for _ in split[c]], dtype=np.int64)
        return files, labels

    converted = 0

    def decoded(files):  # uint8 NHWC, as image files store pixels
        nonlocal converted
        arr, n = _cached_decode(files, cfg)
        converted += n
        return arr.transpose(0, 2, 3, 1)

    ftr, ytr = flat(train)
    rtr = decoded(ftr)
    if test is None:
        rtr, rte, ytr, yte = _split(rtr, ytr, cfg.test_size, cfg.split_seed)
    else:
        fte, yte = flat(test)
        rte = decoded(fte)
    if converted:
        what = "grayscale" if cfg.channels == 3 else "color"
        notes.append(
            f"converted {converted} {what} image(s) to {cfg.channels} channel(s) "
            f"(data.channels={cfg.channels})"
        )
    fmt = {"layout": "NHWC", "dtype": "uint8", "divide_by": 255.0}
    return rtr, ytr, rte, yte, classes, fmt


def _cached_decode(files: list[Path], cfg: ImageFolderData) -> tuple[np.ndarray, int]:
    """Decoded NCHW uint8 images (and the count converted to `channels`), cached on disk keyed
    by the file listing (paths, sizes, mtimes)."""
    if cfg.cache_dir is None:
        arr, converted = _decode(files, cfg)
        return arr.transpose(0, 3, 1, 2), converted
    h = hashlib.sha256(f"{cfg.image_size}:{cfg.channels}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    path = Path(cfg.cache_dir) / f"imagefolder-{h.hexdigest()[:20]}.npy"
    side = path.with_suffix(".json")  # {"converted": n}: what decoding did, for the notes
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            info = json.loads(side.read_text()) if side.is_file() else {}
            if arr.shape == (len(files), cfg.channels, cfg.image_size, cfg.image_size):
                return arr, int(info.get("converted", 0))
        except (OSError, ValueError, AttributeError):
            pass  # a corrupt cache file is rebuilt below
    decoded, converted = _decode(files, cfg)
    arr = np.ascontiguousarray(decoded.transpose(0, 3, 1, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp files with random names, renamed into place: the cache folder may be in a store
    # others can write, and nothing is written through a link planted there.
    from bonsai.safe_io import atomic_write

    note = json.dumps({"converted": converted}).encode()
    atomic_write(side, lambda f: f.write(note), "the decoded-image cache")
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False), "the decoded-image cache")
    return arr, converted


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

    def arrays(ds):  # uint8 [N, H, W] (MNIST) or [N, H, W, C] (CIFAR), as torchvision stores
        return np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)

    xtr, ytr = arrays(tr)
    xte, yte = arrays(te)
    fmt = {"layout": "NHW" if xtr.ndim == 3 else "NHWC", "dtype": "uint8", "divide_by": 255.0}
    return xtr, ytr, xte, yte, list(tr.classes), fmt
