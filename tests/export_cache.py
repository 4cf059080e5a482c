"""Tests only: an ONNX export of a model identical to one already exported in this test session
is copied from that export instead of running torch's dynamo exporter again.

The exporter takes 1-2 s of CPU per small model on the 2-core EPYC (torch.export, the ONNX
decompositions, translation) and is most of what evaluating a stage costs; the suite's commands
train the same tiny teachers and students from the same seeds over and over, and export the
same weights each time. Like a compiler cache, the copy is keyed by everything the export reads:

- the module as pickled (its classes by name, every attribute, every parameter and buffer), and
  the code of every method of every class in it (a test that patches a forward gets its own key);
- the example input's shape, dtype and values, the opset and output names;
- torch's, onnx's and onnxscript's versions.

A model that cannot be pickled, or that carries forward or backward hooks, is exported as usual.
The first export of each model runs torch's exporter; a later identical one gets those bytes
(the dynamo exporter writes the same bytes for the same model: tests/unit/test_stages.py).

`install()` wraps `bonsai.onnx_utils._write_export` in this process (the pytest processes and the
fork server, tests/forkserver.py, before it forks the commands). The folder is
`BONSAI_TEST_EXPORT_CACHE` (made by tests/conftest.py for the session, shared by the xdist
workers and their commands); `BONSAI_TEST_EXPORT_CACHE=0` turns it off, also per command or per
test (read at each export). Fresh interpreters (tests/helpers.py start_cli) export as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import os
import pickle
import shutil
import tempfile
import types
from pathlib import Path

ENV = "BONSAI_TEST_EXPORT_CACHE"


def folder() -> Path | None:
    value = os.environ.get(ENV, "")
    return Path(value) if value and value != "0" else None


def install() -> None:
    import bonsai.onnx_utils as ou

    export = ou._write_export
    if getattr(export, "export_cache", False):  # installed already (a forked child)
        return

    def _write_export(model, example, path, opset, output_names) -> None:  # type: ignore[no-untyped-def]
        where = folder()
        key = key_of(model, example, opset, output_names) if where is not None else None
        if where is None or key is None:
            export(model, example, path, opset, output_names)
            return
        cached = where / f"{key}.onnx"
        if cached.is_file():
            shutil.copyfile(cached, path)
            _count(where, "hit")
            return
        export(model, example, path, opset, output_names)
        _count(where, "miss")
        with contextlib.suppress(OSError):  # a full or vanished folder: no copy kept, no harm
            fd, tmp = tempfile.mkstemp(dir=where, suffix=".part")
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.replace(tmp, cached)  # whole or not at all, for the other processes

    _write_export.export_cache = True  # type: ignore[attr-defined]
    ou._write_export = _write_export  # type: ignore[assignment]


def key_of(model, example, opset: int, output_names: list[str]) -> str | None:  # type: ignore[no-untyped-def]
    """The cache key of one export, or None: export it as usual."""
    import onnx
    import onnxscript
    import torch

    modules = list(model.modules())
    for m in modules:
        if any(
            getattr(m, hooks, None)
            for hooks in (
                "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
            )
        ):  # fmt: skip
            return None
    try:
        blob = _pickled(model)
    except Exception:  # a local class, a lambda, an open file: not this cache's business
        return None
    h = hashlib.sha256()
    h.update(repr((torch.__version__, onnx.__version__, onnxscript.__version__)).encode())
    h.update(
        repr((int(opset), list(output_names), tuple(example.shape), str(example.dtype))).encode()
    )
    h.update(example.detach().cpu().contiguous().numpy().tobytes())
    h.update(blob)
    for cls in sorted({type(m) for m in modules}, key=lambda c: (c.__module__, c.__qualname__)):
        h.update(_code_of(cls))
    return h.hexdigest()


def _pickled(model) -> bytes:  # type: ignore[no-untyped-def]
    """The module pickled, each tensor as its kind, shape, dtype and values (pickle's own form
    of a tensor names its storage's address, another in every process)."""
    import io

    import torch

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):  # type: ignore[no-untyped-def]
            if isinstance(obj, torch.Tensor):
                t = obj.detach().cpu().contiguous()
                values = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                return (
                    type(obj).__name__, str(t.dtype), tuple(t.shape), obj.requires_grad,
                    hashlib.sha256(values).hexdigest(),
                )  # fmt: skip
            if isinstance(obj, torch.storage.TypedStorage | torch.UntypedStorage):
                raise TypeError("a bare storage")  # never in a module's attributes here
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(model)
    return buf.getvalue()


def _code_of(cls: type) -> bytes:
    """Every function defined in `cls` and its bases, by name and code."""
    h = hashlib.sha256()
    for klass in cls.__mro__:
        h.update(f"{klass.__module__}.{klass.__qualname__}".encode())
        for name, value in sorted(vars(klass).items(), key=lambda kv: kv[0]):
            fn = value.__func__ if isinstance(value, classmethod | staticmethod) else value
            if isinstance(fn, property):
                fn = fn.fget
            if isinstance(fn, types.FunctionType):
                h.update(name.encode())
                h.update(marshal.dumps(fn.__code__))
    return h.digest()


def _count(where: Path, what: str) -> None:
    """One line per export in `where/log` (appends of a few bytes do not interleave)."""
    with contextlib.suppress(OSError):
        fd = os.open(where / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{what} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


def counts(where: Path) -> dict[str, int]:
    out = {"hit": 0, "miss": 0}
    with contextlib.suppress(FileNotFoundError):
        for line in (where / "log").read_text().splitlines():
            what = line.split(" ", 1)[0]
            out[what] = out.get(what, 0) + 1
    return out
