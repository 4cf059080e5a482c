"""The format contract: one kind of stored model, one class, registered by its `kind`.

A format declares what the rest of Bonsai would otherwise hard-code about a kind: the main model
file in an artifact's folder, the runtime distribution a device needs for it, whether it runs on
this machine, how an inference session is opened on its file, how the evaluator and the predictor
load it, how its export is checked against torch, and how the footprint probes its memory.

This module imports nothing of Bonsai's at module level but its errors, and the formats never
import `bonsai.artifacts`: artifacts ask this table for their model file, so the formats take
artifacts as arguments (anything with `kind`, `path`, `file` and `meta`: `StoredArtifact`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from bonsai.errors import ArtifactError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn


class StoredArtifact(Protocol):
    """What a format reads of an artifact (`bonsai.artifacts.Artifact` is one)."""

    @property
    def kind(self) -> str: ...

    @property
    def path(self) -> Path: ...  # the artifact's folder

    @property
    def file(self) -> Path: ...  # its main model file

    @property
    def meta(self) -> dict[str, Any]: ...


class Session(Protocol):
    """The slice of onnxruntime's `InferenceSession` Bonsai calls: every format's session speaks
    it, so one batching loop (`onnx_utils.run_logits`) and one timer serve them all."""

    def get_inputs(self) -> Sequence[Any]: ...  # each with `.name` and `.shape`

    def run(self, output_names: Any, input_feed: dict[str, np.ndarray], /) -> list[Any]: ...


FORMATS: dict[str, Format] = {}


class Format:
    kind: ClassVar[str]  # the manifest's "kind", e.g. "onnx"
    model_file: ClassVar[str]  # its main file in an artifact's folder, e.g. "model.onnx"
    # The pip distribution that runs it on a device (the footprint's `runtime_bytes`); None when
    # the device's operating system ships the runtime.
    runtime: ClassVar[str | None]
    # False: nothing on this machine can run it; the evaluator reports its sizes only.
    runs_here: ClassVar[bool] = True
    # The model file is an ONNX graph: the evaluator counts its zero weights and cuts it into
    # single-head models for a multi-task comparison.
    onnx_graph: ClassVar[bool] = False
    # The model file is already a zip archive: its size is its zipped size.
    zipped: ClassVar[bool] = False
    # Set when the stored model cannot be timed as it is (a torch module): the evaluator then
    # times an ONNX export of `load_module` that it writes under this name into its work folder
    # (in the store: `eval/<key>/`), so that every latency is measured in onnxruntime.
    latency_file: ClassVar[str | None] = None
    # Python run in a fresh process by `bonsai.measure.footprint.peak_rss_bytes` with `path` (from
    # `probe_path`), `shape` ([1, C, H, W]) and `threads` defined: import the runtime, load the
    # model, run one inference. None: it cannot run here, so no memory is measured.
    probe: ClassVar[str | None] = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return
        if kind in FORMATS:
            raise TypeError(f"artifact kind {kind!r} registered twice: {FORMATS[kind]} and {cls}")
        FORMATS[kind] = cls()

    def __repr__(self) -> str:
        return f"<format {self.kind}: {self.model_file}>"

    @property
    def suffix(self) -> str:
        """How the name of a file of this format ends: the model file's name from its first dot
        (".onnx", ".mlpackage.zip")."""
        return self.model_file[self.model_file.index(".") :]

    def open_session(self, file: Path, threads: int = 1) -> Session:
        """An inference session on a file of this format with `threads` intra-op threads."""
        raise ArtifactError(f"{self.kind} models cannot run on this machine ({Path(file).name})")

    def artifact_session(self, artifact: StoredArtifact, threads: int = 1) -> Session:
        """The session the predictor runs an artifact of this format in: its model file's."""
        return self.open_session(artifact.file, threads)

    def load_module(self, artifact: StoredArtifact) -> nn.Module:
        """The torch module the artifact holds, for formats with a `latency_file`."""
        raise ArtifactError(f"artifact {str(artifact.path)!r} is {artifact.kind}, not torch")

    @property
    def holds_module(self) -> bool:
        """Whether artifacts of this format hold a torch module (`load_module`): what a stage
        that runs a model in torch takes, e.g. a distillation teacher."""
        return type(self).load_module is not Format.load_module

    def parity(self, model: nn.Module, file: Path, x: torch.Tensor) -> float:
        """Max |this format's runtime - torch| over the logits of `x` and of its first image alone
        (the export stages' gate)."""
        from bonsai.onnx_utils import parity_max_abs_diff

        return parity_max_abs_diff(model, file, x, open_session=self.open_session)

    def verify(self, artifact: StoredArtifact) -> None:
        """Refuse (ArtifactError) a stored artifact whose manifest this format could not load
        safely; checked on every cache hit, so a hand-edited one is a miss, not a failure."""

    def embed_metadata(self, file: Path, entries: dict[str, str]) -> None:
        """Write `entries` (`bonsai.formats.embedded`: preprocessing and output classes) into the
        model file's own metadata, replacing entries of the same names; a format whose files
        hold none leaves the file as it is."""

    def read_metadata(self, file: Path) -> dict[str, str]:
        """The key/value metadata the model file holds (every entry, not only Bonsai's)."""
        return {}

    def size_bytes(self, artifact: StoredArtifact) -> int:
        """The model's bytes as installed on the device: its model file."""
        return artifact.file.stat().st_size

    def probe_path(self, artifact: StoredArtifact) -> Path:
        """What the memory probe loads: the model file."""
        return artifact.file


def get_format(kind: str) -> Format:
    if kind not in FORMATS:
        raise ArtifactError(
            f"unknown artifact kind {kind!r}; this Bonsai reads kinds {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[kind]


def format_of_file(path: Path) -> Format:
    """The format a bare file belongs to, by the end of its name (the longest suffix that fits:
    a timed ONNX export, a single-head cut, a logged model's file)."""
    name = Path(path).name
    fits = [f for f in FORMATS.values() if name.endswith(f.suffix)]
    if not fits:
        raise ArtifactError(
            f"no artifact format reads {name!r}; known files end in "
            f"{', '.join(sorted(f.suffix for f in FORMATS.values()))}"
        )
    return max(fits, key=lambda f: len(f.suffix))


def open_session(path: Path, threads: int = 1) -> Session:
    """An inference session on `path` in the runtime of its format (by `format_of_file`)."""
    return format_of_file(path).open_session(Path(path), threads)
