"""The local store: its layout, the records of finished stage builds, and the locks around them.

    <store>/
      store.json            layout version and the absolute path the store was last used at
      mlflow.db             MLflow's SQLite database (created and checked by tasks/mlflow_backend.py)
      artifacts/            MLflow's run and model artifacts
      stages/<key>/         a stage's artifact (bonsai.artifacts); <key> = <stage name>-<hash>
      eval/<key>/           the evaluator's files for it (latency.onnx: a torch model's export)
      records/<key>.json    a finished build: its artifact's digest and its evaluation
      locks/<key>.lock      held while one process builds <key>; others wait, then reuse it
      .lock                 held while a process creates, checks or relocates the store

Why Bonsai keeps its own records instead of Prefect's result cache: Prefect's cache-key record
names the serializer of its result file, so whoever can edit the store could switch it to pickle
and have the next cached run execute a payload; its records also hold absolute paths, so a copied
or moved store misses every cache entry. Here nothing read from disk decides how it is decoded:
a record is JSON validated against a strict schema, and every path is derived from the record's
key, never read from the record. Anything that does not verify is a cache miss, never an error:
the stage is rebuilt.

Locks are `fcntl.flock` locks on files: the kernel releases them when their holder exits, even on
SIGKILL, so a killed build never blocks the store. Separate `open()`s conflict even within one
process, so threads of one command are serialized the same way as separate commands.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bonsai.artifacts import Artifact, open_artifact, sha256_file
from bonsai.errors import ArtifactError, BonsaiError
from bonsai.formats import FORMATS, get_format
from bonsai.safe_io import atomic_write, is_damaged, move_aside, open_lock_file, real_dir

LAYOUT = 1
# Stage names become folder names, MLflow run names and metric-name prefixes: ASCII letters,
# digits, `_` and `-`, starting with a letter or `_`, at most 64 characters.
STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}-[0-9a-f]{16}")
MAX_RECORD_BYTES = 64 << 20  # a record holds one prediction per test image: far below this


class StoreError(BonsaiError):
    """The store cannot be used as it is (not a folder, not writable, a damaged database)."""


class StoreFull(BonsaiError):
    """The disk holding the store ran out of space."""


def is_safe_stage_name(name: object) -> bool:
    return isinstance(name, str) and STAGE_NAME.fullmatch(name) is not None


def full_disk_error(path: Path | str, err: BaseException) -> StoreFull:
    """One message for ENOSPC, naming the disk, the file being written and what to do."""
    where = Path(_filename(err) or path)
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    try:
        free = shutil.disk_usage(probe).free
        left = f"{free / 1e6:.1f} MB free"
    except OSError:
        left = "free space unknown"
    return StoreFull(
        f"no space left on the disk holding {str(probe)!r} ({left}) while writing "
        f"{str(where)!r}; free some space or point tracking.store_dir at a bigger disk, then run "
        "the same command again: finished stages are reused, nothing half-written is kept"
    )


def _filename(err: BaseException) -> str | None:
    """The file an OSError in `err`'s chain was about, if it says."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and isinstance(e.filename, str):
            return e.filename
        e = e.__cause__ or e.__context__
    return None


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC from the OS, or SQLite's "database or disk is full" (wrapped by MLflow)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(e) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# ---------------------------------------------------------------------------------------------
# Layout


class Store:
    """Paths inside one store; every path is derived from a key, none is read from a file."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def stage_dir(self, key: str) -> Path:
        return self.root / "stages" / _checked(key)

    def eval_dir(self, key: str) -> Path:
        return self.root / "eval" / _checked(key)

    def record_path(self, key: str) -> Path:
        return self.root / "records" / f"{_checked(key)}.json"

    def lock_path(self, key: str) -> Path:
        return self.root / "locks" / f"{_checked(key)}.lock"

    def writable_dir(self, path: Path) -> Path:
        """`path`, a folder in this store, made a real folder before Bonsai writes into it: no
        folder between the root and it is a link (`bonsai.safe_io.real_dir`)."""
        return real_dir(self.root, path)

    def latency_model(self, key: str, kind: str) -> Path:
        """The file the evaluator times: the artifact's model (ONNX, LiteRT), or the export its
        format has it time instead (`Format.latency_file`: a torch model's ONNX export). Core ML
        cannot run here: its package, which nothing times."""
        fmt = get_format(kind)
        if fmt.latency_file is not None:
            return self.eval_dir(key) / fmt.latency_file
        return self.stage_dir(key) / fmt.model_file


def _checked(key: str) -> str:
    if not KEY.fullmatch(key):
        raise ValueError(f"not a stage key: {key!r}")
    return key


# ---------------------------------------------------------------------------------------------
# Records


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class EvaluationRecord(_Strict):
    settings: dict[str, int | bool]  # the eval config the numbers were measured with
    metrics: dict[str, float]  # `accuracy`: the test split's; `val_accuracy`: the validation's
    predictions: list[int]  # argmax class per test image
    latency_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the timed ONNX file
    seconds: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # how long measuring took


class StageRecord(_Strict):
    format: Literal[1] = 1
    key: str
    name: str
    kind: str
    build_id: str = Field(pattern=r"^[0-9a-f]{32}$")  # one computation, across cache hits
    artifact_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    stage_seconds: float = Field(ge=0)
    evaluation: EvaluationRecord


def read_record(store: Store, key: str) -> tuple[StageRecord | None, str]:
    """The record of `key` if it is the JSON Bonsai wrote for this key; else (None, why)."""
    path = store.record_path(key)
    if is_damaged(path, "file"):  # a folder, a link (a loop, or out of the store): rebuild
        move_aside(path, "a stage's record")
        return None, f"record {path.name} was damaged (not a file)"
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None, f"record {path.name} is larger than any record Bonsai writes"
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "no record"
    except OSError as e:
        return None, f"record {path.name} unreadable ({e.strerror})"
    try:
        record = StageRecord.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        return None, f"record {path.name} is not a Bonsai record ({first['msg']})"
    if record.key != key:
        return None, f"record {path.name} belongs to {record.key!r}"
    return record, ""


def write_record(store: Store, record: StageRecord) -> None:
    """Write atomically (temp file, fsync, rename): a crash or a full disk never leaves a
    truncated record that a later run would read."""
    path = store.record_path(record.key)
    store.writable_dir(path.parent)
    data = record.model_dump_json().encode()
    try:
        atomic_write(path, lambda f: f.write(data), "a stage's record")
    except OSError as e:
        if is_disk_full(e):
            raise full_disk_error(path, e) from e
        raise


def verify_build(store: Store, record: StageRecord) -> tuple[Artifact | None, str]:
    """The artifact at the path the key dictates, if it is the one the record describes."""
    folder = store.stage_dir(record.key)
    if is_damaged(folder, "folder"):  # a link (to anywhere) or a file: not a build of ours
        move_aside(folder, "a stage's artifact folder")
        return None, f"{folder.name} was damaged (not a folder)"
    try:
        art = open_artifact(folder)
        get_format(art.kind).verify(art)
    except ArtifactError as e:
        return None, str(e)
    if art.digest != record.artifact_digest:
        return None, "the artifact in the store is not the one the record was written for"
    if art.kind not in FORMATS:
        return None, f"unknown artifact kind {art.kind!r}"
    return art, ""


def evaluation_usable(store: Store, record: StageRecord, kind: str, settings: dict) -> bool:
    """Whether the record's evaluation stands: same settings, timed model present and intact,
    and every accuracy decisions need (a record without the validation split's accuracy is
    re-measured, not trusted to rank by)."""
    if record.evaluation.settings != settings:
        return False
    if get_format(kind).runs_here and "val_accuracy" not in record.evaluation.metrics:
        return False
    latency = store.latency_model(record.key, kind)
    try:
        return sha256_file(latency) == record.evaluation.latency_sha256
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Locks


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing); `on_wait` is called once if another
    holder makes us wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def key_lock(store: Store, key: str, on_wait: Callable[[], None] | None = None):
    """Held while `key` is built: concurrent commands that need it compute it once."""
    path = store.lock_path(key)
    store.writable_dir(path.parent)
    return file_lock(path, on_wait)


def store_lock(root: Path, on_wait: Callable[[], None] | None = None):
    """Held while the store is created, checked or relocated."""
    return file_lock(Path(root) / ".lock", on_wait)


# ---------------------------------------------------------------------------------------------
# The store's own description (for relocation)


def read_layout(root: Path) -> dict | None:
    """store.json, or None when missing or not what Bonsai writes (then it is rewritten)."""
    try:
        data = json.loads((Path(root) / "store.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("root"), str):
        return None
    return data


def write_layout(root: Path) -> None:
    root = Path(root).resolve()
    data = json.dumps({"format": LAYOUT, "root": str(root), "updated": time.time()}).encode()
    atomic_write(root / "store.json", lambda f: f.write(data), "the store's description")
