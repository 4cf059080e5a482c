"""`torch`: a module's weights as safetensors plus the spec that rebuilds its architecture.

`meta.model` is the architecture spec (see `bonsai.models.build_model`) plus the data's
`in_channels` and `num_classes`; that and the safetensors weights rebuild the module, without
pickle. A model whose layers no longer match its spec (structurally pruned, factorized) also
records `meta.model.structure`: the changed modules as plain JSON descriptions, re-applied after
the spec is built (`bonsai.models.structure_diff` / `apply_structure`). Artifacts without it load
as before. Torch variants are timed in onnxruntime, through an ONNX export (`latency_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonsai.errors import ArtifactError
from bonsai.formats.base import Format, StoredArtifact

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


class ModuleFormat(Format):
    """What every kind that loads as a torch module shares (no `kind`: not registered): it runs
    from its artifact in torch, is timed through its ONNX export, and is probed in a fresh
    process by loading it and running one input."""

    runtime = "torch"
    latency_file = "latency.onnx"
    probe = """
import torch
torch.set_num_threads(threads)
from bonsai.artifacts import load_torch, open_artifact
model = load_torch(open_artifact(path)).eval()
with torch.inference_mode():
    model(torch.zeros(shape))
"""

    def artifact_session(self, artifact: StoredArtifact, threads: int = 1) -> ModuleSession:
        return ModuleSession(self.load_module(artifact), artifact.meta["model"]["input_shape"])


class TorchFormat(ModuleFormat):
    kind = "torch"
    model_file = "model.safetensors"

    def open_session(self, file: Path, threads: int = 1) -> ModuleSession:
        raise ArtifactError(
            f"{Path(file).name} holds weights only: a torch model runs from its artifact (its "
            "architecture is in the manifest), and is timed through its ONNX export"
        )

    def verify(self, artifact: StoredArtifact) -> None:
        """The manifest's architecture passes the command line's checks: its spec names a
        `name:` family or an nn.Module class (never any other callable), and its recorded
        structure stays within what pruning and factorization can make of that architecture."""
        from bonsai.models import check_recorded_model

        check_recorded_model(artifact.meta.get("model"), str(artifact.path))

    def load_module(self, artifact: StoredArtifact) -> nn.Module:
        """Rebuild the module from its spec and load its safetensors weights (no pickle)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from bonsai.models import apply_structure, build_model

        self.verify(artifact)  # also when loaded without a cache check (an input, a replay)
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

    def probe_path(self, artifact: StoredArtifact) -> Path:
        return artifact.path  # the probe opens the artifact: the weights need its manifest


def save_weights(model: nn.Module, directory: Path, model_meta: dict[str, Any]) -> dict[str, Any]:
    """Write `model`'s weights as the torch format's model file in `directory`; returns
    `model_meta` with `structure` set to how `model` differs from what its spec builds (the
    manifest around it is `bonsai.artifacts.save_torch`'s)."""
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
    save_file(state, str(Path(directory) / TorchFormat.model_file))
    return model_meta


class _Input:
    def __init__(self, name: str, shape: list[Any]):
        self.name, self.shape = name, shape


class ModuleSession:
    """A torch module behind onnxruntime's `run(None, feed)` / `get_inputs()`: what the
    predictor serves a torch variant through (the module's own threads, no export)."""

    def __init__(self, model: nn.Module, input_shape: list[int]):
        self.model = model
        self.input_shape = list(input_shape)  # [C, H, W]

    def get_inputs(self) -> list[_Input]:
        return [_Input("input", ["batch", *self.input_shape])]

    def run(self, _names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            return [self.model(torch.from_numpy(next(iter(feed.values())))).float().numpy()]
