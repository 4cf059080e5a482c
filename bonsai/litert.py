"""LiteRT (TFLite): convert a torch model with litert-torch, run the result with the ai-edge-litert
interpreter.

The converter, litert-torch, pins typing-extensions<4.13, older than what Prefect and MLflow need,
so it lives in its own environment: `.venv-litert`, made by `make install` on top of the main one
(it adds the converter and its dependencies; torch comes from the main environment). The stage
runs the conversion there, in a subprocess (`convert` below). The interpreter has no such pins and
is a dependency of Bonsai itself, so LiteRT variants are evaluated, timed and served like the
others (`LiteRTSession` speaks the slice of onnxruntime's session API that Bonsai uses).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from bonsai.errors import StageFailed
from bonsai.subprocess_env import bonsai_env

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = ROOT / ".venv-litert" / "bin" / "python"

# Run by the converter's interpreter: rebuild the torch model with Bonsai's safe loader, convert
# at batch 1, write the .tflite file. Prints one JSON line. The input is passed by keyword and
# the outputs returned as a dict, because litert-torch names a signature's inputs and outputs
# after them (positional ones become args_0, output_0, ...): the file's signature then reads
# input -> logits, or input -> one output per head named after it, as the ONNX graph does.
_CONVERT = r"""
import json, sys, warnings, logging
warnings.simplefilter("ignore")
logging.disable(logging.WARNING)
src, dst, heads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import torch
import litert_torch
from bonsai.artifacts import load_torch, open_artifact
from bonsai.onnx_utils import INPUT_NAME, OUTPUT_NAME

assert INPUT_NAME == "input"  # the parameter name below

class Named(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input):
        z = self.model(input)
        if not heads:
            return {OUTPUT_NAME: z}
        return dict(zip([n for n, _ in heads], torch.split(z, [k for _, k in heads], dim=1)))

art = open_artifact(src)
model = Named(load_torch(art).eval()).eval()
shape = art.meta["model"]["input_shape"]
edge = litert_torch.convert(model, sample_kwargs={INPUT_NAME: torch.zeros(1, *shape)})
edge.export(dst)
print(json.dumps({"litert_torch": getattr(litert_torch, "__version__", "?"), "torch": torch.__version__}))
"""


def converter_python(configured: str | None) -> str:
    """The interpreter that has litert-torch: the stage's `python`, else $BONSAI_LITERT_PYTHON,
    else .venv-litert beside this checkout, else this one if it has the converter."""
    for candidate in (configured, os.environ.get("BONSAI_LITERT_PYTHON"), str(DEFAULT_PYTHON)):
        if candidate and Path(candidate).is_file():
            return candidate
    import importlib.util

    if importlib.util.find_spec("litert_torch") is not None:
        return sys.executable
    raise StageFailed(
        "the LiteRT converter (litert-torch) is not installed: it pins typing-extensions<4.13, "
        "so it lives in its own environment; create it with `make install` (it makes "
        f"{DEFAULT_PYTHON.parent.parent}), or point BONSAI_LITERT_PYTHON (or the stage's "
        "`python`) at an interpreter with `pip install litert-torch`"
    )


def convert(
    artifact_dir: Path, dst: Path, heads: list[tuple[str, int]] | None, python: str | None,
    timeout: float = 900,
) -> dict:  # fmt: skip
    """Convert the torch artifact at `artifact_dir` to `dst` (.tflite); raises StageFailed with
    the converter's own last words when it fails (an operator LiteRT lacks, say)."""
    exe = converter_python(python)
    proc = subprocess.run(
        [exe, "-c", _CONVERT, str(artifact_dir), str(dst), json.dumps(heads or [])],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=bonsai_env(),
    )
    if proc.returncode != 0 or not Path(dst).is_file():
        raise StageFailed(f"LiteRT conversion failed: {_reason(proc.stderr or proc.stdout)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reason(text: str) -> str:
    """The converter's error: its last exception line, and the operator it names if any."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln or "not supported" in ln]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:600]


def output_names(path: Path) -> list[str]:
    """The output names of the model's (first) signature, as LiteRT's signature runner returns
    them; empty for a file without signatures."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    return list(next(iter(signatures.values()))["outputs"]) if signatures else []


def embed_metadata(path: Path, entries: dict[str, str], description: str) -> None:
    """Write `entries` into the flatbuffer's `metadata` (name -> buffer of UTF-8 bytes, the
    table TFLite's own `min_runtime_version` lives in), replacing entries of the same names,
    and `description` into the model's description; through ai-edge-litert's flatbuffer tools
    (the TFLite schema's object API), so the rest of the file is written back as it was read."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    kept = [m for m in model.metadata or [] if _text(m.name) not in entries]
    for name, value in sorted(entries.items()):
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(value.encode(), dtype=np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name, len(model.buffers) - 1
        kept.append(entry)
    model.metadata = kept
    model.description = description
    flatbuffer_utils.write_model(model, str(path))


def read_metadata(path: Path) -> dict[str, str]:
    """Every `metadata` entry of a .tflite file, its buffer decoded as UTF-8 (binary entries,
    such as a runtime version padded with zeros, keep their text up to the first zero)."""
    from ai_edge_litert import schema_py_generated as schema

    raw = Path(path).read_bytes()
    model = schema.Model.GetRootAs(raw, 0)
    out = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        buf = model.Buffers(entry.Buffer())
        if buf.Offset():  # a large model keeps buffers after the flatbuffer, by offset
            data = raw[buf.Offset() : buf.Offset() + buf.Size()]
        else:
            data = buf.DataAsNumpy().tobytes() if buf.DataLength() else b""
        out[_text(entry.Name())] = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    return out


def _text(name: str | bytes | None) -> str:
    return name.decode() if isinstance(name, bytes) else str(name or "")


class _Input:
    def __init__(self, name: str, shape: list[int]):
        self.name, self.shape = name, shape


class LiteRTSession:
    """A LiteRT interpreter behind onnxruntime's `run(None, feed)` / `get_inputs()`: batches run
    one image at a time (the model is converted at batch 1, as a phone runs it); with several
    outputs (one per head) they come back in the heads' order."""

    def __init__(self, path: Path, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        from bonsai.errors import ArtifactError

        try:
            self.it = Interpreter(model_path=str(path), num_threads=threads)
            self.it.allocate_tensors()
            order = self._order(path)
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"cannot load LiteRT model {str(path)!r}: {e}") from e
        self.inp = self.it.get_input_details()[0]
        self.outs = order

    def _order(self, path: Path) -> list[dict]:
        """The output tensors in the order of the model's logit columns: as the file's embedded
        `bonsai.outputs` lists them by signature name; a file without it (being checked by its
        export stage, or converted before outputs had names) as the converter emitted them,
        which is the order the torch module returned them (output_0, output_1, ... by number)."""
        from bonsai.formats.embedded import OUTPUTS_KEY

        named = read_metadata(path).get(OUTPUTS_KEY)
        if named and self.it.get_signature_list():
            by_name = self.it.get_signature_runner().get_output_details()
            names = [o["name"] for o in json.loads(named)]
            if set(names) <= set(by_name):
                return [by_name[n] for n in names]
        details = self.it.get_output_details()
        if all(re.search(r"output_\d+", d["name"]) for d in details):
            return sorted(details, key=lambda d: _output_order(d["name"]))
        return details

    def get_inputs(self) -> list[_Input]:
        return [_Input("input", [int(d) for d in self.inp["shape"]])]

    def run(self, _names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(next(iter(feed.values())), dtype=np.float32)
        per_image: list[list[np.ndarray]] = []
        for i in range(len(x)):
            self.it.set_tensor(self.inp["index"], x[i : i + 1])
            self.it.invoke()
            per_image.append([self.it.get_tensor(o["index"]).copy() for o in self.outs])
        return [np.concatenate([p[j] for p in per_image]) for j in range(len(self.outs))]


def _output_order(name: str) -> tuple[int, str]:
    m = re.search(r"output_(\d+)", name)
    return (int(m.group(1)) if m else 0, name)
