"""Stage artifacts on disk: loadable again without pickle, verified by checksums, written atomically.

An artifact is a directory holding `artifact.json` and the files it lists:

    artifact.json        {"format": 1, "kind": <kind>, "files": {name: sha256}, "meta": {...}}
    model.<...>          the main model file of its kind (`bonsai.formats`: model.safetensors
                         for torch, model.onnx, model.tflite, model.mlpackage.zip)

What a kind's files hold and how they load is its format's (`bonsai.formats.<kind>_format`); the
kinds an artifact may have are those the format table holds.
The artifact's digest is the sha256 of its `artifact.json`, which covers every file's checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bonsai.errors import ArtifactError
from bonsai.formats import FORMATS, get_format
from bonsai.formats.torch_format import TorchFormat, save_weights

FORMAT = 1
MANIFEST = "artifact.json"


@dataclass(frozen=True)
class Artifact:
    kind: str  # a key of the format table, `bonsai.formats.FORMATS`
    path: Path  # the artifact's directory
    digest: str  # sha256 of artifact.json
    meta: dict[str, Any]

    @property
    def file(self) -> Path:
        """The main model file."""
        return self.path / get_format(self.kind).model_file

    def ref(self) -> dict[str, str]:
        """A small, JSON-able reference (for task inputs and cache keys)."""
        return {"kind": self.kind, "path": str(self.path), "digest": self.digest}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, kind: str, meta: dict[str, Any]) -> Artifact:
    """Write the preprocessing and output classes `meta` records into the model file's own
    metadata (formats that hold any: `bonsai.formats.embedded`), then checksum every file in
    `directory` and write its manifest; returns the artifact. The metadata goes in first, so
    the checksums (and the artifact's digest) are those of the file as it is shipped."""
    from bonsai.formats.embedded import model_metadata

    directory = Path(directory)
    entries = model_metadata(meta)
    # A kind this Bonsai does not read still gets its manifest (open_artifact refuses it).
    if entries and kind in FORMATS:
        fmt = get_format(kind)
        if (directory / fmt.model_file).is_file():
            fmt.embed_metadata(directory / fmt.model_file, entries)
    files = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "kind": kind, "files": files, "meta": meta}
    text = json.dumps(manifest, indent=2, sort_keys=True)
    (directory / MANIFEST).write_text(text)
    return Artifact(kind, directory, hashlib.sha256(text.encode()).hexdigest(), meta)


def open_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read an artifact's manifest and (by default) verify every file's checksum."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"no artifact at {str(path)!r}: {MANIFEST} is missing")
    text = mpath.read_text()
    try:
        manifest = json.loads(text)
        kind, files, meta = manifest["kind"], manifest["files"], manifest["meta"]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ArtifactError(f"artifact manifest {str(mpath)!r} is corrupted ({why})") from None
    if manifest.get("format") != FORMAT or not isinstance(kind, str) or kind not in FORMATS:
        raise ArtifactError(
            f"artifact {str(path)!r} has format {manifest.get('format')!r} kind {kind!r}; "
            f"this Bonsai reads format {FORMAT}, kinds {', '.join(sorted(FORMATS))}"
        )
    if verify:
        for name, expected in files.items():
            f = path / name
            if Path(name).name != name:
                raise ArtifactError(f"artifact {str(path)!r} lists a file outside it: {name!r}")
            if not f.is_file():
                raise ArtifactError(f"artifact file {str(f)!r} is missing")
            actual = sha256_file(f)
            if actual != expected:
                raise ArtifactError(
                    f"checksum mismatch for {str(f)!r}: expected {expected[:12]}…, got "
                    f"{actual[:12]}… (file truncated or modified); re-run the stage that made it"
                )
    return Artifact(kind, path, hashlib.sha256(text.encode()).hexdigest(), meta)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it is renamed to `final`.

    A crash leaves only a `.tmp-*` directory, which nothing trusts; `final` appears whole or not
    at all. An existing `final` is replaced.
    """
    from bonsai.safe_io import clear_for

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later run remove what a killed process left (remove_stale_temp);
    # mkdtemp's random part means no one can plant a link at the name beforehand.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        clear_for(final, "folder", "an artifact folder")  # a link or a file there: aside
        if final.exists():
            # Rename the old one aside first: readers see the old or the new folder, never a
            # half-deleted one (a forced rebuild while another command reads the artifact).
            old = Path(
                tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent)
            )
            os.replace(final, old)  # onto the empty folder mkdtemp made
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp(parent: Path) -> list[Path]:
    """Delete the temporary directories under `parent` whose writing process no longer exists."""
    removed: list[Path] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for d in parent.glob(".tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)
            continue  # still running: its stage is in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        else:  # a temp file, or a link planted at a temp name: the entry itself goes
            d.unlink(missing_ok=True)
        removed.append(d)
    return removed


# ---------------------------------------------------------------------------------------------
# torch models


def save_torch(model: nn.Module, directory: Path, model_meta: dict[str, Any], **meta) -> Artifact:
    """Save weights as safetensors plus the spec that rebuilds the architecture.

    `model_meta` = {"spec": {...}, "in_channels": C, "num_classes": K, "input_shape": [C, H, W]}.
    When `model` differs from what the spec builds (pruned channels, factorized layers), the
    difference is recorded as `model_meta["structure"]` so that `load_torch` rebuilds it.
    """
    model_meta = save_weights(model, directory, model_meta)
    return write_manifest(directory, TorchFormat.kind, {"model": model_meta, **meta})


def load_torch(artifact: Artifact) -> nn.Module:
    """Rebuild the module from its spec and load its safetensors weights (no pickle); an artifact
    of a kind that holds no torch module is an ArtifactError."""
    return get_format(artifact.kind).load_module(artifact)
