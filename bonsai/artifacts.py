"""Stage artifacts on disk: loadable again without pickle, verified by checksums, written atomically.

An artifact is a directory holding `artifact.json` and the files it lists:

    artifact.json        {"format": 1, "kind": "torch"|"onnx", "files": {name: sha256}, "meta": {...}}
    model.safetensors    torch: the state dict (tensors only)
    model.onnx           onnx: one self-contained file (no external data)

For `torch`, `meta.model` is the architecture spec (see `bonsai.models.build_model`) plus the
data's `in_channels` and `num_classes`; that and the safetensors weights rebuild the module.
A model whose layers no longer match its spec (structurally pruned, factorized) also records
`meta.model.structure`: the changed modules as plain JSON descriptions, re-applied after the
spec is built (`bonsai.models.structure_diff` / `apply_structure`). Artifacts without it load
as before.
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
from typing import Any, Literal

from torch import nn

from bonsai.errors import ArtifactError

FORMAT = 1
MANIFEST = "artifact.json"
Kind = Literal["torch", "onnx", "coreml", "litert"]
KINDS = ("torch", "onnx", "coreml", "litert")
# The main model file of each kind. A Core ML package is a folder; the artifact holds it zipped
# (stored files only, as Xcode and `coremltools.models.MLModel` take it once unzipped).
MODEL_FILES = {
    "torch": "model.safetensors",
    "onnx": "model.onnx",
    "coreml": "model.mlpackage.zip",
    "litert": "model.tflite",
}


@dataclass(frozen=True)
class Artifact:
    kind: Kind
    path: Path  # the artifact's directory
    digest: str  # sha256 of artifact.json
    meta: dict[str, Any]

    @property
    def file(self) -> Path:
        """The main model file."""
        return self.path / MODEL_FILES[self.kind]

    def ref(self) -> dict[str, str]:
        """A small, JSON-able reference (for task inputs and cache keys)."""
        return {"kind": self.kind, "path": str(self.path), "digest": self.digest}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, kind: Kind, meta: dict[str, Any]) -> Artifact:
    """Checksum every file in `directory` and write its manifest; returns the artifact."""
    directory = Path(directory)
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
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"artifact manifest {str(mpath)!r} is corrupted ({e})") from e
    if manifest.get("format") != FORMAT or kind not in KINDS:
        raise ArtifactError(
            f"artifact {str(path)!r} has format {manifest.get('format')!r} kind {kind!r}; "
            f"this Bonsai reads format {FORMAT}, kinds {', '.join(KINDS)}"
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
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later run remove what a killed process left (remove_stale_temp).
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            # Rename the old one aside first: readers see the old or the new folder, never a
            # half-deleted one (a forced rebuild while another command reads the artifact).
            old = final.parent / f".tmp-{final.name}-{os.getpid()}-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
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
        shutil.rmtree(d, ignore_errors=True)
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
    from safetensors.torch import save_file

    from bonsai.models import build_reference, structure_diff

    reference = build_reference(
        model_meta["spec"], model_meta["in_channels"], model_meta["num_classes"]
    )
    structure = structure_diff(model, reference)
    model_meta = {k: v for k, v in model_meta.items() if k != "structure"}
    if structure:
        model_meta["structure"] = structure
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(Path(directory) / "model.safetensors"))
    return write_manifest(directory, "torch", {"model": model_meta, **meta})


def load_torch(artifact: Artifact) -> nn.Module:
    """Rebuild the module from its spec and load its safetensors weights (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bonsai.models import apply_structure, build_model

    if artifact.kind != "torch":
        raise ArtifactError(f"artifact {str(artifact.path)!r} is {artifact.kind}, not torch")
    mm = artifact.meta["model"]
    model = build_model(mm["spec"], mm["in_channels"], mm["num_classes"])
    apply_structure(model, mm.get("structure") or [])  # pruned / factorized layers, if any
    try:
        state = load_file(str(artifact.file))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"cannot read weights {str(artifact.file)!r}: {e}") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor whose shape does not fit (size mismatch)
        raise ArtifactError(
            f"weights in {str(artifact.file)!r} do not fit the architecture {mm['spec']}: {e}"
        ) from e
    if missing or unexpected:
        raise ArtifactError(
            f"weights in {str(artifact.file)!r} do not fit the architecture {mm['spec']}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()
