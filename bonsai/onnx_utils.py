"""ONNX export and onnxruntime execution: sessions, batched inference, parity. Timing lives in
`bonsai.measure.latency`."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bonsai.concurrency import TORCH_GRAPH_LOCK
from bonsai.errors import ArtifactError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class NamedHeads(nn.Module):
    """A multi-task model's concatenated logits [B, K_1 + K_2 + ...] as one tensor per head, so
    that the exported graph has one named output per head."""

    def __init__(self, model: nn.Module, sizes: list[int]):
        super().__init__()
        self.model = model
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.split(self.model(x), self.sizes, dim=1))


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: Path,
    opset: int = 18,
    heads: list[tuple[str, int]] | None = None,
) -> Path:
    """Export `model` to one self-contained .onnx file with a dynamic batch dimension.

    Uses torch's dynamo exporter (the TorchScript one is deprecated). The example batch is 2:
    torch.export specializes a dimension whose example size is 0 or 1. `heads` (a multi-task
    model's (name, columns) per head, `bonsai.heads.heads_from_meta`): one output per head,
    named after it, instead of one `logits` output.
    """
    model = model.eval()
    output_names = [OUTPUT_NAME]
    if heads:
        model = NamedHeads(model, [k for _, k in heads]).eval()
        output_names = [name for name, _ in heads]
    example = torch.zeros(2, *input_shape)
    _write_export(model, example, Path(path), opset, output_names)
    return Path(path)


def _write_export(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, output_names: list[str]
) -> None:
    """torch's dynamo export of `model` on `example` (batch dimension dynamic) to `path`, metadata
    stripped. Looked up at call time: the test suite's export cache (tests/export_cache.py)
    wraps it."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with TORCH_GRAPH_LOCK, warnings.catch_warnings(), _torchlib_registry_reused():
        warnings.simplefilter("ignore")
        # The exporter reports each step at INFO/WARNING through these loggers; keep the run's
        # output to what the user asked for.
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    strip_metadata(path)


# torch's dynamo exporter rebuilds its table of ATen -> ONNX functions (~2,000 entries, read from
# torchlib and onnxscript) on every export: 0.7-1.0 s of each export on a 2-core EPYC, for a
# table that depends only on the opset. Bonsai exports every stage it evaluates, so it builds it
# once per process and opset. Reused only inside export_onnx, which adds no custom translation
# (the one thing that writes into the table); another caller of torch.onnx.export gets torch's
# own fresh table.
_TORCHLIB_REGISTRIES: dict[tuple[type, int], Any] = {}


@contextlib.contextmanager
def _torchlib_registry_reused() -> Iterator[None]:
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):  # a torch without it: its own behaviour
        yield
        return

    def from_torchlib(klass: type, opset_version: int | None = None) -> Any:
        if opset_version is None:  # torch's default, whatever this torch makes it
            return build(klass)
        key = (klass, int(opset_version))
        if key not in _TORCHLIB_REGISTRIES:
            _TORCHLIB_REGISTRIES[key] = build(klass, opset_version=opset_version)
        return _TORCHLIB_REGISTRIES[key]

    setattr(cls, "from_torchlib", classmethod(from_torchlib))  # noqa: B010 - mypy: a method
    try:
        yield
    finally:
        setattr(cls, "from_torchlib", original)  # noqa: B010


def strip_metadata(path: Path) -> None:
    """Drop what the dynamo exporter adds for debugging: per-node metadata (source locations,
    module namespaces), doc strings and intermediate value_info. On a 10k-parameter CNN that was
    54.5 KB against 42.0 KB of weights: the bytes a phone ships, and every size ratio, would
    mostly measure it. Shape information is inferred again by whoever needs it."""
    import onnx

    m = onnx.load(str(path))

    def clean(graph) -> None:
        graph.doc_string = ""
        del graph.metadata_props[:]
        del graph.value_info[:]
        for vi in (*graph.input, *graph.output):
            vi.doc_string = ""
            del vi.metadata_props[:]
        for init in graph.initializer:
            init.doc_string = ""
            del init.metadata_props[:]
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean(attr.g)
                for g in attr.graphs:
                    clean(g)

    clean(m.graph)
    for fn in m.functions:
        fn.doc_string = ""
        del fn.metadata_props[:]
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]
    m.doc_string = ""
    onnx.save(m, str(path))


def check_onnx_file(path: Path) -> None:
    """Refuse an ONNX file that references external data outside its own folder."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises various types on corrupt input
        raise ArtifactError(f"cannot parse ONNX model {str(path)!r}: {e}") from e
    folder = Path(path).resolve().parent
    for init in m.graph.initializer:
        if uses_external_data(init):
            loc = next((e.value for e in init.external_data if e.key == "location"), "")
            target = (folder / loc).resolve()
            if folder not in target.parents:
                raise ArtifactError(
                    f"ONNX model {str(path)!r} points tensor {init.name!r} at external data "
                    f"{loc!r}, outside its folder; refusing to load it"
                )


def session(path: Path, threads: int = 1):
    """An onnxruntime CPU session with a fixed intra-op thread count (a file of any format:
    `bonsai.formats.open_session`)."""
    import onnxruntime as ort

    check_onnx_file(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_logits(sess, x: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits [N, K] for inputs [N, C, H, W], in batches. A model with one output per head
    (multi-task) gives them side by side, as the torch model does."""
    if isinstance(x, torch.Tensor):
        x = x.numpy()
    name = sess.get_inputs()[0].name
    outs = [
        np.concatenate(
            sess.run(None, {name: np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)}),
            axis=1,
        )
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32)


def parity_max_abs_diff(
    model: nn.Module, path: Path, x: torch.Tensor, open_session: Callable[..., Any] = session
) -> float:
    """Max |runtime - torch| over the logits of `x`, and of its first image alone (the batch
    dimension must really be dynamic): `path` runs in onnxruntime, or in the session
    `open_session(path)` makes (a format's own: `bonsai.formats.Format.parity`)."""
    from bonsai.training import predict_logits

    sess = open_session(path)
    ref = predict_logits(model, x).numpy()
    diff = float(np.abs(run_logits(sess, x) - ref).max())
    return max(diff, float(np.abs(run_logits(sess, x[:1]) - ref[:1]).max()))
