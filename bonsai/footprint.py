"""What a variant costs on the device beyond its file: the runtime library it needs, and the
memory one batch-1 inference takes in a fresh process.

- `runtime_bytes(kind)`: the installed size of the library that runs the model (the files pip
  recorded for the distribution): onnxruntime for ONNX variants, torch for torch ones, the
  ai-edge-litert interpreter for LiteRT ones; 0 for Core ML, which iOS and macOS ship. A phone
  app ships a mobile build of these (onnxruntime-mobile, the LiteRT interpreter) that is smaller
  than the desktop wheel measured here; the ratio between runtimes is what this number compares.
- `peak_rss_bytes(...)`: peak resident memory (VmHWM) of a new Python process
  that imports the runtime, loads the model and runs one batch-1 inference on zeros. It includes
  the interpreter itself (10-30 MB; `python_rss_bytes()` measures it alone).

Models are loaded by Bonsai's own safe loaders (safetensors + the recorded architecture) or by
onnxruntime; nothing read from the model's folder chooses how it is deserialized.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# The distribution that runs each artifact kind.
RUNTIMES = {"onnx": "onnxruntime", "torch": "torch", "litert": "ai-edge-litert"}

_PROBE = r"""
import json, resource, sys
kind, path, shape, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
if kind == "onnx":
    import numpy as np
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    sess.run(None, {inp.name: np.zeros(shape, dtype=np.float32)})
elif kind == "litert":
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path, num_threads=threads)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], dtype=np.float32))
    it.invoke()
elif kind == "torch":
    import torch
    torch.set_num_threads(threads)
    from bonsai.artifacts import load_torch, open_artifact
    model = load_torch(open_artifact(path)).eval()
    with torch.inference_mode():
        model(torch.zeros(shape))
print(json.dumps({"peak_rss_bytes": peak()}))
"""

# The peak of this process's own memory. Not getrusage's ru_maxrss: Linux carries it over from
# the parent across fork and exec, so a probe started by a 1 GB process would report 1 GB.
# VmHWM belongs to the address space exec created.
_PEAK = r"""
import resource
def peak():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""


class FootprintError(RuntimeError):
    pass


@functools.cache
def installed_bytes(distribution: str) -> int:
    """Bytes on disk of the files pip installed for `distribution` (0 if not installed)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return 0
    total = 0
    for f in dist.files or []:
        p = Path(str(f.locate()))
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def _runtime(kind: str) -> str:
    if kind not in RUNTIMES:
        raise ValueError(f"no runtime known for artifact kind {kind!r}")
    return RUNTIMES[kind]


def runtime_bytes(kind: str) -> int:
    """Installed size of the runtime an artifact of `kind` needs (Core ML: 0, the framework is
    part of Apple's operating systems; an app ships none)."""
    if kind == "coreml":
        return 0
    return installed_bytes(_runtime(kind))


def peak_rss_bytes(
    kind: str, path: Path, input_shape: tuple[int, ...], threads: int = 1, timeout: float = 120
) -> int:
    """Peak RSS of a fresh process running one batch-1 inference of the model at `path` (an
    ONNX file, or a torch artifact's folder)."""
    _runtime(kind)
    root = Path(__file__).resolve().parent.parent  # so the probe imports this checkout's bonsai
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK + _PROBE,
            kind,
            str(path),
            json.dumps([1, *input_shape]),
            str(threads),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
        env=bonsai_env(),
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FootprintError(f"measuring memory of {path.name} failed: {tail[0]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


@functools.cache
def python_rss_bytes() -> int:
    """Peak RSS of a bare interpreter, the floor every `peak_rss_bytes` includes."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK + "print(peak())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(proc.stdout.strip())


def bonsai_env() -> dict[str, str]:
    """The environment of a subprocess that imports this checkout's bonsai (memory probes, the
    LiteRT converter): PYTHONPATH starts with the checkout; one OpenMP thread by default."""
    import os

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
