"""`torch_program`: a `torch.export` program (`model.pt2`: a graph of aten operators and its
weights), for a model imported without the Python class that defines it (`import` of a `.pt2`
file, or of a TorchScript file or a pickled module converted on import).

`torch.export.load` is not a safe loader as torch 2.14 ships it: it unpickles some payloads
(tensor subclasses, custom and opaque objects, legacy weight files, and its sample inputs when
`weights_only=True` fails), `sympy.sympify`s (that is, evaluates) the symbolic shape expressions
in the graph's JSON, resolves call targets by name anywhere under `torch.*`, compiles the
program's `guards_code` and loads AOTInductor shared libraries found in the archive. Its own
docstring says never to load untrusted files. `check_program` therefore reads the archive as zip
entries and JSON (nothing executed) and admits only what `torch.export.save` writes for an
ordinary model: one program called `model`, raw tensor weights and constants, sample inputs that
load with `weights_only=True`, aten/prims operators (and the `_operator`/`math`/`torch.sym_*`
arithmetic of dynamic shapes), symbolic expressions made of sympy's number and shape functions
only, no guards code, node metadata limited to stack traces and module paths. `load_program`
checks the very bytes it then hands to `torch.export.load`. Every program in a store passed that
check, so loading one never needs trust.

A program runs, is timed (through its ONNX export, as a torch model is), exported to ONNX and used
as a distillation teacher; it has no module structure, so stages that change layers (pruning,
factorization, QAT) or fine-tune it take a `torch` artifact instead (import the weights with the
model's architecture).
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from torch import nn

from bonsai.errors import ArtifactError
from bonsai.formats.base import StoredArtifact
from bonsai.formats.torch_format import ModuleFormat, ModuleSession

MODEL_NAME = "model"  # the one program of an archive torch.export.save writes

# Archive entries (below the archive's root folder) that torch.export.save writes for one
# program; anything else (AOTInductor libraries, pickled objects, other programs, legacy files)
# is refused.
_ENTRIES = [
    re.compile(p)
    for p in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"version",
        r"\.data/version",
        r"\.data/serialization_id",
        r"\.format_version",
        r"\.storage_alignment",
        rf"models/{MODEL_NAME}\.json",
        rf"data/weights/{MODEL_NAME}_weights_config\.json",
        r"data/weights/weight_\d+",
        rf"data/constants/{MODEL_NAME}_constants_config\.json",
        r"data/constants/tensor_\d+",
        rf"data/sample_inputs/{MODEL_NAME}\.pt",
        r"extra/[^/]+",  # extra files: read as text, never executed
    )
]

# Call targets a node may name: operators of the aten and prims libraries, and the arithmetic
# on symbolic sizes of a dynamic batch.
_OPERATOR = re.compile(
    r"torch\.ops\.(aten|prims)\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*"
    r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|pow|eq|ne|lt|le|gt|ge|and_|or_|not_)"
    r"|math\.(ceil|floor|trunc|sqrt)"
    r"|torch\._?sym_[a-z_]+"
)
# Node metadata torch.export.save writes: stack traces and module paths, kept as text, and
# `custom` annotations and `from_node` provenance (a program exported from another's module),
# JSON the deserializer parses: checked to hold plain single-line strings only.
_METADATA = {"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn"}
_JSON_METADATA = {"custom", "from_node"}
# What a symbolic shape expression may call or name: sympy's numbers, arithmetic, comparisons
# and logic, and the shape functions torch registers for its deserializer (`sympify` evaluates
# the expression, so anything else could run code).
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs",
    "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "Piecewise", "ExprCondPair", "true", "false", "True", "False", "oo", "zoo", "nan",
    "Infinity", "NegativeInfinity", "int_oo", "IntInfinity", "NegativeIntInfinity", "One",
    "Zero", "NegativeOne", "Half", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
    "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
}  # fmt: skip
_SYMPY_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.UnaryOp,
    ast.USub, ast.UAdd, ast.Not, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv,
    ast.Mod, ast.Pow, ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
    ast.BoolOp, ast.And, ast.Or, ast.Tuple,
)  # fmt: skip
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but tab and newline, and DEL


class UnsafeProgram(ArtifactError):
    """A .pt2 file holds something `torch.export.load` would unpickle or execute."""


def _unsafe(why: str) -> UnsafeProgram:
    return UnsafeProgram(why)


def _check_expression(text: str) -> None:
    """A symbolic expression that `sympy.sympify` may evaluate: only the names above, numbers,
    quoted symbol names and operators (parsed with `ast`, never evaluated here)."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise _unsafe(f"a symbolic shape expression is not an expression: {text[:80]!r}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            raise _unsafe(f"a symbolic shape expression uses {type(node).__name__}: {text[:80]!r}")
        # A bare name other than those: a symbol of the shape environment (s0, s77, u3, ...).
        if (
            isinstance(node, ast.Name)
            and node.id not in _SYMPY_NAMES
            and not re.fullmatch(r"[a-z]+[0-9]+", node.id)
        ):
            raise _unsafe(f"a symbolic shape expression names {node.id!r}")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES
        ):
            raise _unsafe(f"a symbolic shape expression calls something else: {text[:80]!r}")
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and not _IDENTIFIER.fullmatch(node.value)
        ):
            raise _unsafe(f"a symbolic shape expression holds the string {node.value!r}")


def _check_json(node: Any, key: str = "") -> None:
    """Walk the program's JSON: call targets, symbolic expressions, metadata and strings."""
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str) or _CONTROL.search(k) or "\n" in k:
                raise _unsafe(f"a key holds control characters: {str(k)[:40]!r}")
            _check_entry(k, v, key)
            _check_json(v, "node" if k == "nodes" else k)
    elif isinstance(node, list):
        for v in node:
            _check_json(v, key)
    # Stack traces are kept as text (a comment line per frame in the generated code): newlines
    # are theirs alone, and no string carries other control characters (a carriage return would
    # end a generated comment line).
    elif isinstance(node, str) and (
        _CONTROL.search(node) or ("\n" in node and key != "stack_trace")
    ):
        raise _unsafe(f"a string holds control characters: {node[:60]!r}")


def _check_entry(k: str, v: Any, parent: str) -> None:
    """One key of the program's JSON, by what the deserializer does with its value."""
    if k in ("target", "as_operator") and isinstance(v, str) and not _OPERATOR.fullmatch(v):
        raise _unsafe(
            f"a node calls {v!r}, not an aten operator (torch.export.load would resolve it by "
            "name and the program would call it)"
        )
    if k == "expr_str" and isinstance(v, str):
        _check_expression(v)
    if k == "metadata" and isinstance(v, dict) and parent == "node":
        extra = set(v) - _METADATA - _JSON_METADATA
        if extra:
            raise _unsafe(f"it holds node metadata {sorted(extra)}")
        for name in _JSON_METADATA & set(v):
            _check_json_text(v[name], name)
    if k in ("as_graph", "as_custom_obj", "as_graphs"):
        raise _unsafe(f"a node takes a {k[3:]} argument (control flow or custom object)")
    if k == "custom_obj_values" and v:
        raise _unsafe("the graph holds custom (torchbind) objects")
    if k == "guards_code" and v:
        raise _unsafe("the program carries guards code (compiled and run on load)")
    if k == "range_constraints" and isinstance(v, dict):
        for name in v:
            if not _IDENTIFIER.fullmatch(str(name)):
                raise _unsafe(f"a shape symbol is named {str(name)[:40]!r}")
    names = ("parameter_name", "buffer_name", "tensor_constant_name")
    if k in names and isinstance(v, str) and not _FQN.fullmatch(v):
        raise _unsafe(f"a weight is named {v[:60]!r}")


def _check_json_text(text: Any, what: str) -> None:
    """Metadata the deserializer parses as JSON: plain values whose strings have no control
    characters at all (they end up in comments of the generated code)."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError):
        value = None
    if value is None and text not in ("null",):
        raise _unsafe(f"its {what} node metadata is not JSON")
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            stack += v
        elif isinstance(v, str) and (_CONTROL.search(v) or "\n" in v or "\t" in v):
            raise _unsafe(f"its {what} node metadata holds control characters: {v[:60]!r}")


def check_program(data: bytes, name: str) -> None:
    """Refuse (`UnsafeProgram`, naming what) a .pt2 archive holding anything beyond what
    `torch.export.save` writes for an ordinary model; nothing in it is executed or unpickled
    here except the sample inputs, by `torch.load(weights_only=True)`. Other defects of the
    archive are `ArtifactError`s."""
    import torch

    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ArtifactError(f"{name} is not a torch.export archive (.pt2 zip): {e}") from None
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise ArtifactError(f"{name} is not a torch.export archive: no single root folder")
    root = roots.pop()
    inner = {n.split("/", 1)[1]: n for n in names if not n.endswith("/")}
    for entry in inner:
        if not any(p.fullmatch(entry) for p in _ENTRIES):
            raise _unsafe(f"it holds {entry!r}, which torch.export.load would unpickle or load")

    def read(entry: str) -> bytes:
        if entry not in inner:
            raise ArtifactError(f"{name} is not a torch.export archive: {entry} is missing")
        return z.read(f"{root}/{entry}")

    if read("archive_format").decode(errors="replace") != "pt2":
        raise ArtifactError(f"{name} is not a torch.export archive (archive_format is not pt2)")
    try:
        program = json.loads(read(f"models/{MODEL_NAME}.json"))
        weights = json.loads(read(f"data/weights/{MODEL_NAME}_weights_config.json"))
        constants = json.loads(read(f"data/constants/{MODEL_NAME}_constants_config.json"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{name}: a JSON entry of the archive is corrupted ({e})") from None
    for what, config, prefix in (
        ("weight", weights, "weight_"),
        ("constant", constants, "tensor_"),
    ):
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise ArtifactError(f"{name}: its {what} table is not a mapping")
        for fqn, payload in entries.items():
            if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
                raise _unsafe(f"{what} {str(fqn)[:60]!r} is pickled")
            if not str(payload.get("path_name", "")).startswith(prefix):
                raise _unsafe(f"{what} {str(fqn)[:60]!r} is not a plain tensor")
            if not _FQN.fullmatch(str(fqn)):
                raise _unsafe(f"a {what} is named {str(fqn)[:60]!r}")
    if not isinstance(program, dict):
        raise ArtifactError(f"{name}: its program is not a JSON object")
    _check_json(program)
    # torch.export.load reads the sample inputs with weights_only=True and, should that fail,
    # again with weights_only=False: they must load the first way.
    sample = read(f"data/sample_inputs/{MODEL_NAME}.pt")
    if sample:
        try:
            torch.load(io.BytesIO(sample), weights_only=True)
        except Exception as e:  # noqa: BLE001 - any refusal means torch would unpickle it
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            why = f"they reference {found.group(1)}" if found else type(e).__name__
            raise _unsafe(
                f"its sample inputs are not plain tensors ({why}): torch.export.load would "
                "unpickle them"
            ) from None


class ProgramModule(nn.Module):
    """A torch.export program's module (`ExportedProgram.module()`) as an ordinary `nn.Module`.
    The program's graph was captured in eval mode (batch norm on its running statistics, dropout
    off) and stays in it: `train()`/`eval()` only set this wrapper's flag (the program's own
    module refuses both)."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, x):
        return self.program(x)

    def train(self, mode: bool = True):
        self.training = mode
        return self


def load_program(path: Path) -> nn.Module:
    """The module of the checked program at `path`: the bytes checked are the bytes loaded."""
    import logging
    import warnings

    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {str(path)!r}: {e}") from e
    check_program(data, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.export").setLevel(logging.ERROR)
        try:
            program = torch.export.load(io.BytesIO(data))
            module = program.module()
        except Exception as e:  # noqa: BLE001 - a checked archive torch still cannot read
            raise ArtifactError(
                f"torch.export cannot load {str(path)!r} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); it may come from another torch "
                f"version than {torch.__version__}"
            ) from e
    return ProgramModule(module)


class ProgramFormat(ModuleFormat):
    kind = "torch_program"
    model_file = "model.pt2"

    def open_session(self, file: Path, threads: int = 1) -> ModuleSession:
        raise ArtifactError(
            f"{Path(file).name} is a torch.export program: it runs from its artifact (its input "
            "shape is in the manifest), and is timed through its ONNX export"
        )

    def verify(self, artifact: StoredArtifact) -> None:
        """The stored program passes `check_program` and its manifest records its input."""
        mm = artifact.meta.get("model")
        shape = mm.get("input_shape") if isinstance(mm, dict) else None
        if not (
            isinstance(shape, list)
            and len(shape) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise ArtifactError(f"artifact {str(artifact.path)!r}: its manifest has no input shape")
        try:
            check_program(artifact.file.read_bytes(), str(artifact.file))
        except OSError as e:
            raise ArtifactError(f"cannot read {str(artifact.file)!r}: {e}") from e

    def load_module(self, artifact: StoredArtifact) -> nn.Module:
        return load_program(artifact.file).eval()

    def probe_path(self, artifact: StoredArtifact) -> Path:
        return artifact.path  # the probe opens the artifact (load_torch checks the program)
