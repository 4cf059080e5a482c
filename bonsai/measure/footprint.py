"""What a variant costs on the device beyond its file: the runtime library it needs, and the
memory one batch-1 inference takes in a fresh process.

- `runtime_bytes(kind)`: the installed size of the library that runs the model (the files pip
  recorded for the distribution its format declares, `bonsai.formats`): onnxruntime for ONNX
  variants, torch for torch ones, the ai-edge-litert interpreter for LiteRT ones; 0 for Core ML,
  which iOS and macOS ship. A phone app ships a mobile build of these (onnxruntime-mobile, the
  LiteRT interpreter) that is smaller than the desktop wheel measured here; the ratio between
  runtimes is what this number compares.
- `peak_rss_bytes(...)`: peak resident memory (VmHWM) of a new Python process that imports the
  runtime, loads the model and runs one batch-1 inference on zeros (the format's `probe`). It
  includes the interpreter itself (10-30 MB; `python_rss_bytes()` measures it alone).

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

from bonsai.formats import FORMATS, Format
from bonsai.measure.latency import THREADS
from bonsai.subprocess_env import ROOT, bonsai_env

# Run before a format's own probe (`Format.probe`), which then loads the model and runs once.
_PROBE_ARGS = r"""
import json, resource, sys
path, shape, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
"""
_PRINT_PEAK = r"""
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


def _format(kind: str) -> Format:
    if kind not in FORMATS:
        raise ValueError(f"no runtime known for artifact kind {kind!r}")
    return FORMATS[kind]


def runtime_bytes(kind: str) -> int:
    """Installed size of the runtime an artifact of `kind` needs (its format's `runtime`; 0 for
    one the operating system ships, as Apple's systems ship Core ML: an app ships none)."""
    runtime = _format(kind).runtime
    return installed_bytes(runtime) if runtime else 0


def peak_rss_bytes(
    kind: str,
    path: Path,
    input_shape: tuple[int, ...],
    threads: int = THREADS,
    timeout: float = 120,
) -> int:
    """Peak RSS of a fresh process running one batch-1 inference of the model at `path` (what
    the format's `probe_path` names: its model file, or a torch artifact's folder)."""
    probe = _format(kind).probe
    if probe is None:  # nothing here runs it (Core ML)
        raise ValueError(f"no runtime known for artifact kind {kind!r}")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK + _PROBE_ARGS + probe + _PRINT_PEAK,
            str(path),
            json.dumps([1, *input_shape]),
            str(threads),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,  # with bonsai_env: the probe imports this checkout's bonsai
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
