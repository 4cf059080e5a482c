"""`import`: bring a model trained elsewhere into the store, so that it is evaluated like any other
stage and can be the reference every variant is compared against.

    path: net.pth                      + model: {_target_: my_pkg.Net}  -> torch (weights)
    path: net.safetensors              + model: {name: resnet18}        -> torch (weights)
    path: net.pt2                      (torch.export program)           -> torch_program
    path: net.pt (TorchScript or torch.save(model))   + trust: true     -> torch_program
    path: net.onnx                     (external data beside it)        -> onnx
    pretrained: resnet18               (torchvision weights, downloaded once) -> torch

A weights file (a state_dict, plain or wrapped, or safetensors) needs the architecture it was
saved from (`model`, a spec as `train` takes: a `name:` family or `_target_`); its keys and
shapes must match exactly. Given `model`, the weights of a .pt2, TorchScript or pickled module are
taken the same way, and the result is an ordinary torch model every stage takes. Without
`model` such a file is imported as a torch.export program (`bonsai/formats/program_format.py`):
evaluated, a distillation teacher, exported to ONNX; not pruned, factorized or fine-tuned. What is
read without running code from the file, and what needs `trust: true`: `bonsai/model_files.py`.

The file is converted into the store (safetensors + architecture, a checked .pt2, one ONNX file
with its external data inlined and Bonsai's input/output names), and the cache key holds the
file's sha256, not its path (`key_params`): editing the file makes a new build, moving it leaves
finished builds as they are. Every check that needs the file runs before any compute
(`check_models`).

Inputs are the data's images normalized as every stage sees them (per-channel mean and std of
the training split): a model trained on other preprocessing sees other inputs here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator, model_validator

from bonsai.artifacts import Artifact, write_manifest
from bonsai.errors import ArtifactError, ConfigError
from bonsai.formats import get_format
from bonsai.model_files import (
    check_onnx_runs,
    check_runs,
    detect,
    existing_file,
    external_files,
    match_weights,
    normalize_onnx,
    onnx_macs,
    onnx_params,
    pretrained_file,
    program_macs,
    program_params,
    read_checkpoint,
    sha256_of,
    suffix_format,
    tensors_of,
    to_program,
)
from bonsai.models import build_model, check_spec_value
from bonsai.stages.base import ModelCheck, Stage, StageConfig, StageContext
from bonsai.stages.common import data_meta, save_trained


class ImportConfig(StageConfig):
    # The model file (a path on this machine; `~` and paths relative to the current folder work).
    path: str | None = None
    # How to read it: auto (by the name's end and the content), or one of bonsai.model_files.FORMATS.
    format: Literal["auto", "state_dict", "safetensors", "torch_export", "torchscript", "pickle", "onnx"] = "auto"  # fmt: skip
    # The architecture of a weights file (a spec as `train` takes: {name: cnn, width: 32} or
    # {_target_: my_pkg.nets.Net}); built for the data's channels and classes. With a .pt2,
    # TorchScript or pickled module it imports that file's weights into this architecture.
    model: dict[str, Any] | None = None
    # Instead of `path`: torchvision weights by name (resnet18: its default weights, or
    # ResNet18_Weights.IMAGENET1K_V1), downloaded once into torch's cache (needs internet).
    pretrained: str | None = None
    # Allow loading a file that runs code when loaded (TorchScript, a pickled module, a .pt2
    # outside the checked subset). Only for files you made yourself or trust.
    trust: bool = False

    @field_validator("model")
    @classmethod
    def _spec(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_spec_value(v)
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.pretrained is None):
            raise ValueError(
                "set exactly one of path (your model file: a .pt/.pth/.safetensors state_dict "
                "with `model`, a .pt2, TorchScript or .onnx file) and pretrained (torchvision "
                f"weights by name, e.g. resnet18); got path={self.path!r}, "
                f"pretrained={self.pretrained!r}"
            )
        if self.pretrained is not None and (self.model is not None or self.format != "auto"):
            raise ValueError(
                "pretrained names its own architecture and file: leave model and format unset"
            )
        if self.model is not None and self.model.get("pretrained"):
            raise ValueError(
                "model.pretrained would download other weights into the architecture: the "
                "weights come from path (set model.pretrained=false, or use pretrained=<name>)"
            )
        is_onnx = self.format == "onnx" or (
            self.format == "auto" and suffix_format(self.path or "") == "onnx"
        )
        if is_onnx and self.model is not None:
            raise ValueError(
                "an ONNX file carries its own graph: leave model unset (it is for weights files)"
            )
        return self


def _source(c: ImportConfig) -> tuple[Path, dict[str, Any] | None]:
    """(the file to import, the architecture its weights go into, if any)."""
    if c.pretrained is not None:
        return pretrained_file(c.pretrained)
    assert c.path is not None, "validated: path or pretrained"
    return existing_file(c.path), c.model


def _files(c: ImportConfig, path: Path, fmt: str) -> list[Path]:
    """Every file the import reads: the model file, and an ONNX file's external data."""
    return [path, *external_files(path)] if fmt == "onnx" else [path]


def _outputs(heads) -> list[tuple[str, int]] | None:
    """Each head's (name, columns) of multi-task data; None for one task."""
    return list(zip(heads.names, heads.sizes, strict=True)) if heads is not None else None


class Import(Stage):
    kind = "import"
    Config = ImportConfig
    consumes = (None,)
    produces = "torch"  # with `model` or `pretrained`; see output_kind

    @classmethod
    def output_kind(cls, config: StageConfig) -> str:
        c: ImportConfig = config  # type: ignore[assignment]
        if c.pretrained is not None:
            return "torch"
        fmt = c.format if c.format != "auto" else suffix_format(c.path or "")
        if fmt == "onnx":
            return "onnx"
        return "torch" if c.model is not None else "torch_program"

    @classmethod
    def chain_hint(cls, config: StageConfig, wanted: tuple[str, ...]) -> str:
        kind = cls.output_kind(config)
        if kind == "torch_program" and "torch" in wanted:
            return (
                "an imported program (.pt2, TorchScript) has no layers to change or train: set "
                "the import's `model` to the architecture it was saved from, and its weights are "
                "imported into that architecture as a torch model, which every torch stage takes"
            )
        if kind == "onnx" and "torch" in wanted:
            return (
                "an ONNX import stays ONNX (it feeds quantize.*): import the PyTorch weights "
                "(.pt/.pth/.safetensors with `model`) for torch stages"
            )
        return ""

    @classmethod
    def key_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters with `path` replaced by the sha256 of what it holds (the file, and an
        ONNX file's external data): the build depends on the content, not on where it lies."""
        c = cls.Config.model_validate(params)
        path, _ = _source(c)
        fmt = detect(path, c.format)
        keyed = {k: v for k, v in params.items() if k != "path"}
        return {**keyed, "sha256": sha256_of(_files(c, path, fmt))}

    @classmethod
    def check_models(cls, config: StageConfig, models: ModelCheck) -> None:
        """Everything about the file, before any compute: it exists, its format is known (and
        may be loaded without `trust`), its weights fit the architecture key by key, the model
        runs on the data's images and outputs one logit per class."""
        c: ImportConfig = config  # type: ignore[assignment]
        path, spec = _source(c)
        fmt = detect(path, c.format)
        shape, classes = tuple(models.input_shape), models.num_classes
        kind = cls.output_kind(c)
        if fmt == "onnx":
            external_files(path)  # inside the file's folder, present
            with tempfile.TemporaryDirectory(prefix="bonsai-import-") as tmp:
                file = Path(tmp) / "model.onnx"
                normalize_onnx(path, file, shape)
                check_onnx_runs(file, classes, shape, path, "path")
            return
        if kind == "torch_program" and fmt in ("state_dict", "safetensors"):
            raise ConfigError(
                f"path: {path.name} holds weights only ({fmt}): set `model` to the architecture "
                "they were saved from (a spec as train takes, e.g. {_target_: my_pkg.nets.Net} "
                "or {name: cnn, width: 32}), or import a file that holds the whole model (.pt2, "
                "TorchScript with trust, .onnx)"
            )
        loaded = read_checkpoint(path, fmt, c.trust)
        if kind == "torch":
            assert spec is not None
            # A model of its own: the ModelCheck's are shared and must not be changed.
            model = _build(spec, shape, classes)
            weights = match_weights(tensors_of(loaded, path), model, path, spec)
            model.load_state_dict(weights, strict=False)  # strictness checked by match_weights
            check_runs(model.eval(), shape, classes, path, "path")
        else:
            module = _as_module(loaded)
            check_runs(module, shape, classes, path, "path")
            if fmt != "torch_export" or not _checked(path):  # converted on import: try it now
                try:
                    to_program(module, shape, fmt)
                except ArtifactError as e:
                    raise ConfigError(
                        f"path: {e}; export it as a torch.export program (.pt2) or an ONNX file "
                        "yourself, or give its architecture (`model`) to import its weights"
                    ) from None

    def run(self, ctx: StageContext) -> Artifact:
        c: ImportConfig = self.config  # type: ignore[assignment]
        path, spec = _source(c)
        fmt = detect(path, c.format)
        kind = self.output_kind(c)
        files = _files(c, path, fmt)
        # Hashed before it is read, and again once the artifact is written: a file edited
        # meanwhile fails the build instead of storing other content under this key.
        source: dict[str, Any] = {
            "file": path.name,
            "format": fmt,
            "sha256": sha256_of(files),
            "bytes": sum(f.stat().st_size for f in files),
            **({"pretrained": c.pretrained} if c.pretrained else {}),
        }
        ctx.log(
            f"{ctx.name}: importing {path.name} ({fmt}, sha256 {source['sha256'][:12]}) as {kind}"
        )
        if kind == "onnx":
            art = _import_onnx(ctx, path, source)
        elif kind == "torch":
            assert spec is not None, "validated: model or pretrained"
            art = _import_weights(ctx, c, path, fmt, spec, source)
        else:
            art = _import_program(ctx, c, path, fmt, source)
        if sha256_of(files) != source["sha256"]:
            raise ArtifactError(
                f"{path.name} changed while it was imported; run again to import what it holds now"
            )
        return art


def _model_meta(ctx: StageContext, params: int, macs: int) -> dict[str, Any]:
    """What an imported ONNX file's or program's manifest records of the model (the torch
    format's `model_meta` without an architecture spec)."""
    shape = ctx.data.input_shape
    heads = ctx.data.heads
    return {
        "input_shape": list(shape),
        "in_channels": shape[0],
        "num_classes": ctx.data.num_outputs,
        "params": params,
        "macs": macs,
        **({"heads": heads.describe()} if heads is not None else {}),
    }


def _import_onnx(ctx: StageContext, path: Path, source: dict[str, Any]) -> Artifact:
    """One self-contained ONNX file in Bonsai's conventions (`normalize_onnx`), checked."""
    shape, classes = ctx.data.input_shape, ctx.data.num_outputs
    out = ctx.out_dir / get_format("onnx").model_file
    normalize_onnx(path, out, shape, _outputs(ctx.data.heads))
    check_onnx_runs(out, classes, shape, path, "path")
    mm = _model_meta(ctx, onnx_params(out), onnx_macs(out, shape))
    return write_manifest(
        ctx.out_dir, "onnx", {"model": mm, "data": data_meta(ctx), "source": source}
    )


def _import_weights(
    ctx: StageContext, c: ImportConfig, path: Path, fmt: str, spec: dict[str, Any], source
) -> Artifact:
    """The file's weights in the architecture `spec`, as an ordinary torch artifact."""
    shape, classes = ctx.data.input_shape, ctx.data.num_outputs
    model = _build(spec, shape, classes)
    loaded = read_checkpoint(path, fmt, c.trust)
    weights = match_weights(tensors_of(loaded, path), model, path, spec)
    model.load_state_dict(weights, strict=False)  # strictness checked by match_weights
    check_runs(model.eval(), shape, classes, path, "path")
    return save_trained(model, spec, ctx, [], source=source)


def _import_program(
    ctx: StageContext, c: ImportConfig, path: Path, fmt: str, source: dict[str, Any]
) -> Artifact:
    """A program: a .pt2 that passes the check is stored byte for byte; anything else (with
    trust) is loaded and converted into a checked .pt2."""
    from bonsai.formats.program_format import UnsafeProgram, check_program, load_program

    shape, classes = ctx.data.input_shape, ctx.data.num_outputs
    out = ctx.out_dir / get_format("torch_program").model_file
    data = path.read_bytes() if fmt == "torch_export" else b""
    try:
        if not data:
            raise UnsafeProgram("not a torch.export archive: converted")
        check_program(data, path.name)
    except UnsafeProgram:  # TorchScript, a pickled module, a .pt2 loaded with trust
        data = to_program(_as_module(read_checkpoint(path, fmt, c.trust)), shape, fmt)
    out.write_bytes(data)
    module = load_program(out).eval()
    check_runs(module, shape, classes, path, "path")
    mm = _model_meta(ctx, program_params(module), program_macs(module, shape))
    return write_manifest(
        ctx.out_dir, "torch_program", {"model": mm, "data": data_meta(ctx), "source": source}
    )


def _checked(path: Path) -> bool:
    """Whether the .pt2 file passes `check_program` (and is stored as it is)."""
    from bonsai.formats.program_format import UnsafeProgram, check_program

    try:
        check_program(path.read_bytes(), path.name)
    except UnsafeProgram:
        return False
    return True


def _build(spec: dict[str, Any], shape: tuple[int, ...], classes: int):
    return build_model(spec, shape[0], classes).eval()


def _as_module(loaded: Any):
    """A loaded program file as a module: the wrapper Bonsai calls `eval()` on."""
    from torch import nn

    from bonsai.formats.program_format import ProgramModule

    if isinstance(loaded, nn.Module) and not isinstance(loaded, ProgramModule):
        try:
            loaded.eval()
        except NotImplementedError:  # an ExportedProgram's module: its mode is fixed
            return ProgramModule(loaded)
        return loaded
    if not isinstance(loaded, nn.Module):
        raise ConfigError(
            f"path: the file holds a {type(loaded).__name__}, not a model; without `model` "
            "Bonsai imports a whole model (.pt2, TorchScript, a pickled nn.Module)"
        )
    return loaded
