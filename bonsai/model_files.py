"""A user's own model file, read as safely as its format allows (the `import` stage's work).

What a file can hold, and how it is read:

    format        files                     read with                            needs
    state_dict    .pt .pth .bin .ckpt       torch.load(weights_only=True)        `model` (architecture)
    safetensors   .safetensors              safetensors (no pickle at all)       `model`
    torch_export  .pt2                      checked, then torch.export.load      (trust if outside the
                                            (bonsai/formats/program_format.py)    checked subset)
    torchscript   .pt .pth .ts .torchscript torch.jit.load: runs the file's code  trust: true
    pickle        .pt .pth .pkl             torch.load(weights_only=False)       trust: true
    onnx          .onnx (+ external data)   onnx / onnxruntime (no code)         -

A `.pt`/`.pth` file is recognized by its content: a TorchScript archive by its `code/` folder, a
torch.export archive by its `archive_format`, otherwise a `torch.save` file, which is a state_dict
when `torch.load(weights_only=True)` accepts it (a plain one, or one wrapped in a dict under
`state_dict`, `model_state_dict`, `model`, `net` or `module`, as training scripts and Lightning
save them) and a pickled object otherwise. Weights match their architecture strictly: every key
and every shape, after removing one prefix the whole checkpoint shares (`model.`, `module.`,
`net.`, `_orig_mod.`: Lightning, DataParallel, torch.compile).

Files loaded with trust are converted on import into a form loaded without it: weights into the
architecture's safetensors, a module without architecture into a checked torch.export program.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bonsai.errors import ArtifactError, ConfigError

# How a file's name ends -> the format it is read as ("checkpoint": a torch.save or TorchScript
# file, told apart by content).
SUFFIXES = {
    ".onnx": "onnx",
    ".safetensors": "safetensors",
    ".pt2": "torch_export",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".pt": "checkpoint",
    ".pth": "checkpoint",
    ".bin": "checkpoint",
    ".ckpt": "checkpoint",
    ".tar": "checkpoint",
    ".pkl": "checkpoint",
}
FORMATS = ("state_dict", "safetensors", "torch_export", "torchscript", "pickle", "onnx")
# Formats that hold a program (a graph that runs without the model's Python class).
PROGRAM_FORMATS = ("torch_export", "torchscript", "pickle")
# Entries of a checkpoint dict that training code stores the weights under.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# Prefixes a whole checkpoint's keys may carry: Lightning's attribute, DataParallel's wrapper,
# a training loop's attribute name, torch.compile's wrapper.
PREFIXES = ("model.", "module.", "net.", "_orig_mod.")

SAFE_FORMATS_TEXT = (
    "state_dict .pt/.pth and .safetensors files with `model`, .pt2 torch.export programs and "
    ".onnx files load without running code from the file"
)


def sha256_of(paths: list[Path]) -> str:
    """One digest over the files' contents, in order (an ONNX file and its external data)."""
    h = hashlib.sha256()
    for p in paths:
        f = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                f.update(chunk)
        h.update(f.hexdigest().encode())
    return h.hexdigest()


def suffix_format(path: str) -> str | None:
    """The format a file name suggests (`SUFFIXES`), or None."""
    name = Path(path).name.lower()
    for suffix, fmt in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    return None


def existing_file(path: str, where: str = "path") -> Path:
    """The file `path` names (user paths: `~` expanded, relative to the current folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"{where}: no file at {str(p)!r}; give the path of your model file (a .pt/.pth "
            "state_dict, .safetensors, .pt2, TorchScript or .onnx file)"
        )
    if not p.is_file():
        raise ConfigError(f"{where}: {str(p)!r} is not a file; give the model file itself")
    return p.resolve()


def detect(path: Path, declared: str, where: str = "path") -> str:
    """The format of the file at `path`: `declared` ("auto": by name and content), checked
    against what the file holds. ConfigError naming the file for a file of no known format."""
    fmt = suffix_format(str(path)) if declared == "auto" else declared
    accepted = ", ".join(sorted(SUFFIXES))
    if fmt is None:
        raise ConfigError(
            f"{where}: {path.name} is of no format Bonsai imports (files ending in {accepted}); "
            "set `format` (one of " + ", ".join(FORMATS) + ") if the name misleads"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    names: list[str] = []
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        pass  # not a zip archive (or a broken one): told apart below
    is_zip = bool(names)
    content = None
    if is_zip and any(re.fullmatch(r"[^/]+/code/.+", n) for n in names):
        content = "torchscript"
    elif is_zip and any(re.fullmatch(r"[^/]+/archive_format", n) for n in names):
        content = "torch_export"
    elif (is_zip and any(re.fullmatch(r"[^/]+/data\.pkl", n) for n in names)) or (
        not is_zip and head[:1] == b"\x80"  # a pickle's protocol opcode: a legacy torch.save
    ):
        content = "checkpoint"
    if fmt == "checkpoint":
        if content is None:
            raise ConfigError(
                f"{where}: {path.name} is not a PyTorch file (neither a torch.save checkpoint, a "
                "TorchScript archive nor a torch.export program); give one of those, a "
                ".safetensors or an .onnx file"
            )
        fmt = _checkpoint_kind(path, names) if content == "checkpoint" else content
    elif fmt in ("state_dict", "pickle") and content != "checkpoint":
        raise ConfigError(f"{where}: {path.name} is not a torch.save file (format={fmt})")
    elif fmt in ("torchscript", "torch_export") and content != fmt:
        raise ConfigError(
            f"{where}: {path.name} is not a {'TorchScript' if fmt == 'torchscript' else 'torch.export (.pt2)'}"
            f" archive{'' if content is None else f' (it holds a {content} file)'}"
        )
    elif fmt == "safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - a header that is not safetensors
            raise ConfigError(f"{where}: {path.name} is not a safetensors file ({e})") from None
    elif fmt == "onnx":
        import onnx

        try:
            onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf raises various types
            raise ConfigError(
                f"{where}: {path.name} is not an ONNX model ({type(e).__name__}: {e})"
            ) from None
    return fmt


# Modules a torch.save'd state_dict's pickle refers to (tensors, storages, ordered dicts);
# anything else (torch.nn.modules..., a user's package) makes it a pickled object.
_WEIGHT_MODULES = (
    "collections", "torch._utils", "torch", "torch.storage", "_codecs", "builtins", "numpy",
    "numpy.core.multiarray", "numpy._core.multiarray",
)  # fmt: skip


def _checkpoint_kind(path: Path, names: list[str]) -> str:
    """ "state_dict" or "pickle" for a torch.save zip file, by the classes its pickle names:
    read with pickletools (its opcodes listed, nothing executed). A legacy (non-zip) file is
    taken for a state_dict; loading it decides (`_torch_load`)."""
    import pickletools

    entry = next((n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)), None)
    if entry is None:
        return "state_dict"
    strings: list[str] = []
    try:
        with zipfile.ZipFile(path) as z:
            for op, arg, _ in pickletools.genops(z.read(entry)):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings = [*strings[-1:], str(arg)]
                    continue
                if op.name == "GLOBAL":
                    module = str(arg).split(" ", 1)[0]
                elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                    module = strings[0]
                else:
                    continue
                if module not in _WEIGHT_MODULES:
                    return "pickle"
    except Exception:  # noqa: BLE001 - an unreadable pickle: loading it will say so
        return "state_dict"
    return "state_dict"


# ---------------------------------------------------------------------------------------------
# Loading what needs trust: said once, loaded quietly


@contextmanager
def _quiet() -> Iterator[None]:
    """torch warns on every TorchScript load and export step; the stage reports what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        levels = {}
        for name in ("torch.export", "torch._export", "torch._dynamo", "torch.fx"):
            logger = logging.getLogger(name)
            levels[name] = logger.level
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def needs_trust(path: Path, fmt: str, why: str, where: str = "path") -> ConfigError:
    what = {
        "torchscript": "a TorchScript archive: loading it compiles and runs the code it holds",
        "pickle": "a pickled Python object (torch.save of a whole module): loading it runs "
        "code the file names",
        "torch_export": "a torch.export program that torch.export.load would unpickle or "
        "execute parts of",
    }[fmt]
    fix = {
        "torchscript": "or save it as a torch.export program (torch.export.save, .pt2) or an "
        "ONNX file instead",
        "pickle": "or save model.state_dict() and import it with its architecture (`model`)",
        "torch_export": "or export it again from an ordinary model",
    }[fmt]
    return ConfigError(
        f"{where}: {path.name} is {what} ({why}); Bonsai loads such a file only when the import "
        "sets trust: true (e.g. pipeline.stages.model.trust=true), for a file you made yourself "
        f"or trust, {fix}. Safe without trust: {SAFE_FORMATS_TEXT}"
    )


def _torch_load(path: Path, trust: bool, where: str) -> Any:
    """A torch.save file: with weights_only=True, or, with trust, as any pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refusals and corrupt files
        text = str(e)
        global_ = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if not global_ and "weights_only" not in text.lower() and "Weights only" not in text:
            raise ConfigError(
                f"{where}: cannot read {path.name} as a torch.save file "
                f"({type(e).__name__}: {text.splitlines()[0] if text else ''})"
            ) from None
        if not trust:
            why = f"it references {global_.group(1)}" if global_ else "it is not plain tensors"
            raise needs_trust(path, "pickle", why, where) from None
    with _quiet():
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: Path, fmt: str, trust: bool, where: str = "path") -> Any:
    """What the file holds, loaded: a state_dict (or a dict wrapping one), an nn.Module (a
    trusted pickle or TorchScript), or an ExportedProgram's module (a .pt2)."""
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if fmt in ("state_dict", "pickle"):
        return _torch_load(path, trust, where)
    if fmt == "torchscript":
        if not trust:
            raise needs_trust(path, "torchscript", "TorchScript has no safe loader", where)
        with _quiet():
            return torch.jit.load(str(path), map_location="cpu")
    if fmt == "torch_export":
        from bonsai.formats.program_format import UnsafeProgram, load_program

        try:
            return load_program(path).program
        except UnsafeProgram as e:
            if not trust:
                raise needs_trust(path, "torch_export", str(e), where) from None
        except ArtifactError as e:
            raise ConfigError(f"{where}: {e}") from None
        with _quiet():
            return torch.export.load(str(path)).module()
    raise ConfigError(f"{where}: {path.name} ({fmt}) holds no torch model")


def tensors_of(obj: Any, path: Path, where: str = "path") -> dict[str, torch.Tensor]:
    """The state_dict a loaded checkpoint holds: itself, a module's, or the dict under one of
    `WRAPPER_KEYS` (non-tensor entries of a state_dict, such as Lightning's, are ignored)."""

    def plain(d: Any) -> dict[str, torch.Tensor] | None:
        if isinstance(d, nn.Module):
            return {k: v for k, v in d.state_dict().items() if isinstance(v, torch.Tensor)}
        if isinstance(d, dict) and d and all(isinstance(k, str) for k in d):
            t = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
            if t and len(t) >= len(d) / 2:
                return t
        return None

    found = plain(obj)
    if found is None and isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if key in obj and (found := plain(obj[key])) is not None:
                break
    if found is None:
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(
            f"{where}: {path.name} holds no state_dict (found {keys}); Bonsai reads a dict of "
            f"tensors, or one under {', '.join(WRAPPER_KEYS)}"
        )
    return found


def match_weights(
    state: dict[str, torch.Tensor], model: nn.Module, path: Path, spec: dict, where: str = "path"
) -> dict[str, torch.Tensor]:
    """`state` keyed as `model`'s state_dict: every key present, no key left over, every shape
    equal (after removing one prefix all keys share, see `PREFIXES`). ConfigError naming the
    keys that do not match otherwise."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # num_batches_tracked is a counter batch norm refills when a checkpoint lacks it.
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    candidates = [state] + [
        {k[len(p) :]: v for k, v in state.items()}
        for p in PREFIXES
        if all(k.startswith(p) for k in state)
    ]
    best = max(candidates, key=lambda c: len(set(c) & set(want)))
    missing = sorted(set(want) - set(best) - optional)
    unexpected = sorted(set(best) - set(want))
    shapes = sorted(k for k in set(want) & set(best) if tuple(best[k].shape) != want[k])
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])})")
        if shapes:
            shown = ", ".join(f"{k} {list(best[k].shape)} vs {list(want[k])}" for k in shapes[:5])
            parts.append(f"{len(shapes)} of another shape (file vs architecture: {shown})")
        raise ConfigError(
            f"{where}: the weights in {path.name} do not fit the architecture {spec}: "
            f"{'; '.join(parts)}. Give the architecture the file was saved from (`model`, "
            "with the data's channels and classes), or the file made from it"
        )
    return {k: v for k, v in best.items()}


# ---------------------------------------------------------------------------------------------
# Programs: a module without its Python class, stored as a checked torch.export program


def check_runs(
    model: nn.Module, input_shape: tuple[int, ...], num_outputs: int, path: Path, where: str
) -> None:
    """A zero batch of 2, and of 1, runs and gives [batch, num_outputs] logits."""
    for batch in (2, 1):
        try:
            with torch.no_grad():
                out = model(torch.zeros(batch, *input_shape))
        except Exception as e:  # noqa: BLE001 - any failure is a mismatch with the data
            text = str(e).strip().splitlines()
            raise ConfigError(
                f"{where}: the model in {path.name} cannot run on a batch of {batch} of the "
                f"data's images {list(input_shape)} ({type(e).__name__}: "
                f"{text[0][:200] if text else ''}); it must take float32 [batch, C, H, W] "
                "inputs with a dynamic batch size (torch.export: dynamic_shapes={'x': {0: "
                "torch.export.Dim('batch')}})"
            ) from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape != (batch, num_outputs):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"{where}: the model in {path.name} outputs {got} for a batch of {batch}, but "
                f"the data has {num_outputs} classes: it must output one logit per class, "
                f"[batch, {num_outputs}]"
            )


BATCH_MAX = 4096


def to_program(module: nn.Module, input_shape: tuple[int, ...], fmt: str) -> bytes:
    """A checked torch.export archive of `module` (in eval mode) with a dynamic batch dimension
    (1 to BATCH_MAX): what a program import stores. TorchScript goes through torch's
    converter first."""
    from bonsai.formats.program_format import check_program

    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=BATCH_MAX)
    with _quiet():
        if isinstance(module, torch.jit.ScriptModule):
            from torch._export.converter import TS2EPConverter

            module = TS2EPConverter(module, (example,)).convert().module()
        try:
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        except Exception as e:  # noqa: BLE001 - the exporter's refusals are many types
            raise ArtifactError(
                f"cannot make a torch.export program of the imported {fmt} model "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
        for node in program.graph.nodes:  # the provenance of a re-export: not needed
            node.meta.pop("from_node", None)
            node.meta.pop("custom", None)
        buf = io.BytesIO()
        torch.export.save(program, buf)
    data = buf.getvalue()
    check_program(data, "the converted program")
    return data


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def program_params(model: nn.Module) -> int:
    """Parameters of a program's module: its parameters, or, where a conversion made them
    buffers (TorchScript's), its buffers but batch norm's running statistics."""
    params = sum(p.numel() for p in model.parameters())
    if params:
        return params
    return sum(b.numel() for n, b in model.named_buffers() if not n.endswith(_STATISTICS))


def program_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of a batch-1 forward pass of a module without module structure
    (convolutions, matrix products), counted by torch's FLOP counter: half its FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops()) // 2


# ---------------------------------------------------------------------------------------------
# ONNX files


def _tensors_with_data(model) -> Iterator[Any]:
    """Every tensor of the graph (initializers and attribute tensors, subgraphs included)."""
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)


def external_files(path: Path, where: str = "path") -> list[Path]:
    """The external data files an ONNX file refers to, each checked to lie inside the file's own
    folder (no absolute path, no `..`, no link leading out). ConfigError otherwise."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.resolve()
    files: list[Path] = []
    for t in _tensors_with_data(model):
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (folder / loc).resolve()
        if not loc or os.path.isabs(loc) or folder not in target.parents:
            raise ConfigError(
                f"{where}: {path.name} points tensor {t.name!r} at external data {loc!r}, "
                f"outside its folder {str(folder)!r}; external data must lie beside the .onnx "
                "file (save it with a relative location, or as one file)"
            )
        if not target.is_file():
            raise ConfigError(
                f"{where}: {path.name} needs external data {loc!r}, missing from "
                f"{str(folder)!r}; copy it beside the .onnx file"
            )
        if target not in files:
            files.append(target)
    return files


def _rename(graph, renames: dict[str, str]) -> None:
    """Rename values throughout a graph and its subgraphs."""
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.name in renames:
            vi.name = renames[vi.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename(attr.g, renames)
            for g in attr.graphs:
                _rename(g, renames)


def onnx_io(model) -> tuple[Any, list[Any]]:
    """(the data input, the outputs) of an ONNX model: inputs that are initializers are
    weights, not inputs (older exporters list them)."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ValueError(
            f"it takes {len(inputs)} inputs ({[i.name for i in inputs]}); Bonsai feeds one image batch"
        )
    return inputs[0], list(model.graph.output)


def normalize_onnx(
    path: Path,
    dest: Path,
    input_shape: tuple[int, ...],
    outputs: list[tuple[str, int]] | None = None,
    where: str = "path",
) -> None:
    """Write the ONNX file at `path` to `dest` as one self-contained file (external data
    inlined) in Bonsai's conventions: its input named `input` with a dynamic batch dimension,
    its output named `logits`, or, for multi-task data (`outputs`: each head's name and
    columns), one output per head named after it (a single output of all heads' logits is
    split into them). ConfigError for an input that is not float32 [batch, C, H, W] of the
    data's shape."""
    import onnx

    from bonsai.onnx_utils import INPUT_NAME, OUTPUT_NAME, strip_metadata

    model = onnx.load(str(path), load_external_data=True)
    try:
        inp, outs = onnx_io(model)
    except ValueError as e:
        raise ConfigError(f"{where}: {path.name}: {e}") from None
    t = inp.type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
    shown = [d if d is not None else "?" for d in dims]
    if t.elem_type != onnx.TensorProto.FLOAT:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else "unknown"
        raise ConfigError(
            f"{where}: {path.name} takes {dtype} input {inp.name!r}; Bonsai feeds float32 images "
            "normalized per channel (export the model with a float32 input)"
        )
    if len(dims) != 4:
        raise ConfigError(
            f"{where}: {path.name} takes input {inp.name!r} of shape {shown}; Bonsai feeds "
            f"images [batch, {', '.join(map(str, input_shape))}] (NCHW)"
        )
    for i, (have, want) in enumerate(zip(dims[1:], input_shape, strict=True)):
        if isinstance(have, int) and have > 0 and have != want:
            raise ConfigError(
                f"{where}: {path.name} takes input {inp.name!r} of shape {shown}, but the data's "
                f"images are [batch, {', '.join(map(str, input_shape))}] ({'CHW'[i]} differs); "
                "import a model made for this data, or set data.image_size / data.channels "
                "(image folders) to what it takes"
            )
    if isinstance(dims[0], int) and dims[0] not in (0, 1):
        raise ConfigError(
            f"{where}: {path.name} takes a fixed batch of {dims[0]} (input shape {shown}); "
            "export it with a dynamic batch dimension (torch.onnx.export(..., dynamic_shapes="
            "...) or dynamic_axes={'input': {0: 'batch'}})"
        )
    names = [n for n, _ in outputs] if outputs else [OUTPUT_NAME]
    renames = {inp.name: INPUT_NAME}
    if len(outs) == len(names):
        renames.update({o.name: n for o, n in zip(outs, names, strict=True)})
    _rename(model.graph, {k: v for k, v in renames.items() if k != v})
    if outputs and len(outputs) > 1 and len(outs) == 1:
        _split_heads(model, outputs)
    # A dynamic batch: the input's first dimension (and every output's) becomes `batch`.
    for vi in (*[i for i in model.graph.input if i.name == INPUT_NAME], *model.graph.output):
        shape = vi.type.tensor_type.shape
        if shape.dim:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = "batch"
    del model.graph.value_info[:]  # inferred again; a fixed batch there would contradict
    try:
        onnx.save(model, str(dest))
    except ValueError as e:  # over protobuf's 2 GB: it cannot be one file
        raise ConfigError(f"{where}: {path.name} cannot be stored as one ONNX file: {e}") from None
    # Without the exporter's debugging metadata, as Bonsai's own exports: the bytes compared
    # are the model's (bonsai.onnx_utils.strip_metadata).
    strip_metadata(dest)


def _split_heads(model, outputs: list[tuple[str, int]]) -> None:
    """Split the graph's one output [batch, sum of columns] into one output per head, named
    after it, as Bonsai's own exports of multi-task models have them."""
    import onnx
    from onnx import helper, numpy_helper

    whole = model.graph.output[0]
    sizes = numpy_helper.from_array(np.array([k for _, k in outputs], np.int64), "head_sizes")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 13:  # the sizes as an input since opset 13, an attribute before
        model.graph.initializer.append(sizes)
        split = helper.make_node(
            "Split", [whole.name, "head_sizes"], [n for n, _ in outputs], axis=1
        )
    else:
        split = helper.make_node(
            "Split", [whole.name], [n for n, _ in outputs], axis=1, split=[k for _, k in outputs]
        )
    model.graph.node.append(split)
    del model.graph.output[:]
    for name, k in outputs:
        model.graph.output.append(
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", k])
        )


def check_onnx_runs(
    file: Path, num_outputs: int, input_shape: tuple[int, ...], source: Path, where: str
) -> None:
    """The normalized file checks (onnx.checker) and runs in onnxruntime on zero batches of 2
    and 1, giving [batch, num_outputs] logits (several outputs side by side)."""
    import onnx
    import onnxruntime as ort

    from bonsai.onnx_utils import run_logits

    try:
        onnx.checker.check_model(str(file))
    except Exception as e:  # noqa: BLE001 - the checker's ValidationError and friends
        raise ConfigError(
            f"{where}: {source.name} is not a valid ONNX model (onnx.checker: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4  # a failure is reported below, once
    try:
        sess = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        for batch in (2, 1):
            out = run_logits(sess, np.zeros((batch, *input_shape), np.float32), batch)
            if out.shape != (batch, num_outputs):
                raise ConfigError(
                    f"{where}: {source.name} outputs {list(out.shape)} for a batch of {batch}, "
                    f"but the data has {num_outputs} classes: it must output one logit per "
                    f"class, [batch, {num_outputs}]"
                )
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's failures (fixed shapes inside)
        raise ConfigError(
            f"{where}: {source.name} does not run in onnxruntime on a batch of the data's "
            f"images {list(input_shape)} ({_tail(e)}); if its graph fixes the batch size, "
            "export it with a dynamic batch dimension"
        ) from None


def _tail(e: Exception, limit: int = 240) -> str:
    """An exception's text on one line, its end kept when long (onnxruntime says what failed
    last, after the source location)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else "..." + text[-limit:]


def onnx_params(path: Path) -> int:
    """Parameters of an ONNX model: the elements of its initializers of rank >= 1, but the
    shapes Reshape and Expand take."""
    import onnx

    model = onnx.load(str(path))
    shapes = {  # the shape operand of Reshape/Expand: not a weight
        n.input[1]
        for n in model.graph.node
        if n.op_type in ("Reshape", "Expand") and len(n.input) > 1
    }
    return sum(
        int(np.prod(t.dims)) for t in model.graph.initializer if t.dims and t.name not in shapes
    )


def onnx_macs(path: Path, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of a batch-1 forward pass of an ONNX model: its Conv, ConvTranspose,
    Gemm and MatMul nodes, with shapes from onnx's shape inference at batch 1 (nodes whose
    shapes it cannot infer are not counted)."""
    import onnx

    model = onnx.load(str(path))
    inp, _ = onnx_io(model)
    for d, v in zip(inp.type.tensor_type.shape.dim, (1, *input_shape), strict=False):
        d.Clear()
        d.dim_value = v
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - an op shape inference does not know: count what we can
        return 0
    shapes: dict[str, list[int]] = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = [
            d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim
        ]
        shapes[vi.name] = dims
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)

    def known(name: str) -> list[int] | None:
        s = shapes.get(name)
        return s if s and all(d > 0 for d in s) else None

    macs = 0
    for node in model.graph.node:
        out = known(node.output[0]) if node.output else None
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = known(node.input[1])
            if out and w:
                if node.op_type == "Conv":  # each output element: C_in/groups x kernel
                    macs += int(np.prod(out)) * int(np.prod(w[1:]))
                else:  # each input element spreads over C_out/groups x kernel
                    x = known(node.input[0])
                    if x:
                        macs += int(np.prod(x)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            a = known(node.input[0])
            if out and a:
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                k = a[-2] if (node.op_type == "Gemm" and trans_a) else a[-1]
                macs += int(np.prod(out)) * k
    return macs


# ---------------------------------------------------------------------------------------------
# Pretrained weights by name (torchvision)


def pretrained_weights(name: str, where: str = "pretrained") -> tuple[Any, str]:
    """(torchvision's weights enum member, the name of its model builder) for `name`: a
    classification model (`resnet18`: its DEFAULT weights) or a weights name
    (`ResNet18_Weights.IMAGENET1K_V1`). ConfigError naming the choices otherwise."""
    import torchvision.models as tvm

    if name.startswith("timm:"):
        try:
            import timm  # noqa: F401
        except ImportError:
            installed = "timm is not installed in this environment"
        else:
            installed = "timm models are not imported by name"
        raise ConfigError(
            f"{where}: {name!r}: {installed}; save the timm model's weights "
            "(torch.save(model.state_dict(), 'net.pth')) or a torch.export program of it "
            "(torch.export.save, .pt2) and import that file with path=..."
        )
    models = tvm.list_models(module=tvm)
    if "_Weights." in name:
        try:
            weights = tvm.get_weight(name)
        except (KeyError, ValueError, AttributeError):
            raise ConfigError(
                f"{where}: no torchvision weights named {name!r}; e.g. "
                "ResNet18_Weights.IMAGENET1K_V1, or a model name such as resnet18"
            ) from None
        builder = next((m for m in models if tvm.get_model_weights(m) is type(weights)), None)
        if builder is None:
            raise ConfigError(f"{where}: {name!r} are not the weights of a classification model")
        return weights, builder
    if name not in models:
        raise ConfigError(
            f"{where}: {name!r} is not a torchvision classification model; one of "
            f"{', '.join(models[:12])}, ... (torchvision.models.list_models), or a weights name "
            "such as ResNet18_Weights.IMAGENET1K_V1"
        )
    return tvm.get_model_weights(name).DEFAULT, name


def pretrained_file(name: str, where: str = "pretrained") -> tuple[Path, dict[str, Any]]:
    """(the weights file of `name` in torch's hub cache, its architecture spec). A file not
    cached yet is downloaded once (torch's own downloader, hash-checked); offline that is a
    ConfigError saying it needs internet, and how to give the file instead."""
    weights, builder = pretrained_weights(name, where)
    url = weights.url
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / os.path.basename(url)
    spec = {"_target_": f"torchvision.models.{builder}"}  # the stock architecture the weights fit
    if not target.is_file():
        hash_prefix = re.search(r"-([a-f0-9]+)\.", target.name)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(
                url, str(target), hash_prefix=hash_prefix.group(1) if hash_prefix else None,
                progress=False,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - offline, refused, interrupted: many types
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"{where}: {name} ({weights}) weights are downloaded from {url} into "
                f"{str(cache)!r}, and that failed ({type(e).__name__}: {reason}): it needs "
                "internet once. Offline, put that file there (from a machine that has internet: "
                f"the same URL), or import a local file instead: path=<file>.pth with "
                f"model={{_target_:torchvision.models.{builder}}}"
            ) from None
    return target, spec
