"""Every MLflow call Bonsai makes lives here: store set-up, parent and child runs, model logging.

Runs are addressed by id through `MlflowClient` or opened explicitly per thread: Prefect runs
tasks in worker threads and MLflow's active run is per thread, so nothing relies on an ambient
active run across threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402,F401  (typing)

from bonsai.formats import FORMATS, get_format  # noqa: E402
from tasks import retry  # noqa: E402

TAG_STAGE = "bonsai.stage"
TAG_KIND = "bonsai.kind"
TAG_INPUT_RUN = "bonsai.input_run_id"
TAG_TEACHER_RUN = "bonsai.teacher_run_id"
TAG_ARTIFACT = "bonsai.artifact_digest"
TAG_ARTIFACT_KIND = "bonsai.artifact_kind"  # torch | onnx | coreml | litert
TAG_DATA = "bonsai.data_digest"
# What registered models are named after (bonsai-<data set>-<policy>): an image folder's name.
TAG_DATA_SET = "bonsai.data_set"
TAG_ROLE = "bonsai.role"
TAG_HOST = "bonsai.host"
TAG_PID = "bonsai.pid"
TAG_PROC_START = "bonsai.proc_start"
TAG_ERROR = "bonsai.error"
TAG_BUILD = "bonsai.build_id"
TAG_CACHED = "bonsai.cached"
TAG_CACHED_FROM = "bonsai.cached_from_run_id"
TAG_MODEL_URI = "bonsai.model_uri"

# Runs this process has opened and not yet ended, so a SIGTERM can close them (KILLED).
_OPEN_RUNS: set[str] = set()
_OPEN_LOCK = threading.Lock()


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), to tell a live process from
    a later one that reused its pid; "" where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_tags() -> dict[str, str]:
    pid = os.getpid()
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(pid), TAG_PROC_START: _proc_start(pid)}


def _owner_alive(tags: dict[str, str]) -> bool:
    """Whether the process that opened a run (per its tags) still runs on this host."""
    if tags.get(TAG_HOST) != socket.gethostname() or TAG_PID not in tags:
        return True  # another machine's run, or not ours: never touch it
    pid = int(tags[TAG_PID])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = tags.get(TAG_PROC_START, "")
    return not started or _proc_start(pid) == started


def reap_orphans(experiment_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a Bonsai process on this host that has died
    (SIGKILL, OOM, power loss). Returns their ids."""
    client = retry.client()
    reaped = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            max_results=500,
            page_token=page_token,
        )
        for run in page:
            if TAG_PID in run.data.tags and not _owner_alive(run.data.tags):
                client.set_tag(
                    run.info.run_id,
                    TAG_ERROR,
                    f"process {run.data.tags[TAG_PID]} died while this run was RUNNING; "
                    "marked KILLED by a later Bonsai start",
                )
                client.set_terminated(run.info.run_id, status="KILLED")
                reaped.append(run.info.run_id)
        page_token = page.token
        if not page_token:
            return reaped


def _opened(run_id: str) -> None:
    with _OPEN_LOCK:
        _OPEN_RUNS.add(run_id)


def _closed(run_id: str) -> bool:
    """Forget an open run; False if it was already closed (e.g. by the SIGTERM handler)."""
    with _OPEN_LOCK:
        if run_id in _OPEN_RUNS:
            _OPEN_RUNS.discard(run_id)
            return True
        return False


def kill_open_runs(reason: str) -> list[str]:
    """End every run this process still has open as KILLED (for a SIGTERM handler)."""
    with _OPEN_LOCK:
        runs = list(_OPEN_RUNS)
        _OPEN_RUNS.clear()
    client = retry.client()
    for rid in runs:
        try:
            client.set_tag(rid, TAG_ERROR, reason)
            client.set_terminated(rid, status="KILLED")
        except Exception:  # noqa: BLE001 - best effort while the process is being stopped
            pass
    return runs


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(config: dict[str, Any]) -> str:
    """What a run built, as 16 hex digits: the resolved config without `tracking` (which store
    and experiment it was recorded in), so a recipe replays against a copied or other store.
    `runtime.device` is left out too: it says where the recipe trained, not what it built (and
    runs recorded before the key existed keep their hash)."""
    what = {k: v for k, v in config.items() if k != "tracking"}
    if isinstance(what.get("runtime"), dict):
        what["runtime"] = {k: v for k, v in what["runtime"].items() if k != "device"}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


# Overrides that say where or how a command ran, not what it built: left out of run names.
_NOT_IN_NAMES = (
    "tracking.",
    "hydra.",
    "runtime.progress",
    "runtime.cpus",
    "runtime.max_workers",
    "runtime.device",
)


def short_overrides(overrides: list[str], limit: int = 80) -> str:
    """`pipeline.stages.student.temperature=2 teacher=cnn_large` -> `temperature=2 teacher=cnn_large`:
    the last key component, or the last two where the last is ambiguous."""
    pairs = [
        o.lstrip("+~").split("=", 1)
        for o in overrides
        if "=" in o and not o.lstrip("+~").startswith(_NOT_IN_NAMES)
    ]
    lasts = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    parts = []
    for (k, v), last in zip(pairs, lasts, strict=True):
        key = last if lasts.count(last) == 1 else ".".join(k.split(".")[-2:])
        parts.append(f"{key}={v}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dataset_input(data, name: str):
    """The test split as an MLflow dataset (the runs table's Dataset column), digest = Bonsai's."""
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    ds = from_numpy(
        data.raw_test, targets=data.test_y.numpy(), name=f"{name}-test", digest=data.digest
    )
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "test")])


def start_parent(
    experiment_id: str,
    pipeline: str,
    config: dict[str, Any],
    overrides: list[str],
    data,
    data_set: str,
    params: dict[str, str] | None = None,
) -> tuple[str, str]:
    """The pipeline's run: (run id, run name). Named `<pipeline> #<n> · <overrides>`, so runs
    are told apart in lists and chart legends; every config value is a param (a sweep's
    variables become columns and axes), and so is each of `params` (what the command found
    out, e.g. `runtime.device_resolved`); the test split is its dataset; `data_set` (the data's
    name, `bonsai.data.data_set_name`) is a tag, which promotions name registered models by."""
    client = retry.client()
    from bonsai import __version__

    earlier = client.search_runs(
        [experiment_id],
        f"tags.`{TAG_ROLE}` = 'pipeline' and tags.`bonsai.pipeline` = '{pipeline}'",
        max_results=10000,
    )
    name = f"{pipeline} #{len(earlier) + 1}"
    if short := short_overrides(overrides):
        name += f" · {short}"
    data_info = data.describe()
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={
            TAG_ROLE: "pipeline",
            "bonsai.pipeline": pipeline,
            "bonsai.config_hash": config_hash(config),
            TAG_DATA: data_info["digest"],
            TAG_DATA_SET: data_set,
            "bonsai.version": __version__,
            "bonsai.overrides": " ".join(overrides),
            "mlflow.source.git.commit": git_commit(),
            "mlflow.note.content": "Bonsai pipeline run; one child run per stage. The "
            "comparison table and the Pareto plot are in its artifacts.",
            **_owner_tags(),
        },
    )
    rid = run.info.run_id
    _opened(rid)
    client.log_dict(rid, config, "config/resolved.json")
    client.log_dict(rid, {"overrides": overrides}, "config/overrides.json")
    client.log_dict(rid, data_info, "data.json")
    flat = {**flatten(config), **(params or {})}
    for batch in _batches([mlflow.entities.Param(k[:250], v[:6000]) for k, v in flat.items()], 100):
        client.log_batch(rid, params=batch)
    client.log_inputs(rid, datasets=[_dataset_input(data, config["data"]["name"])])
    return rid, name


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def end_run(run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    if not _closed(run_id):
        return  # already ended (KILLED by the SIGTERM handler)
    client = retry.client()
    if error:
        client.set_tag(run_id, TAG_ERROR, error[:5000])
    client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def child_run(
    experiment_id: str,
    parent_run_id: str,
    run_name: str,
    stage: str,
    kind: str,
    params: dict[str, Any],
    input_run_id: str | None,
    teacher_run_id: str | None,
    data=None,
    data_name: str = "",
) -> Iterator[str]:
    """An MLflow run for one stage, nested under the pipeline's run, active in this thread.

    `params` are every knob the stage ran with (defaults included). It ends FAILED (with the
    error recorded) if the body raises, FINISHED otherwise.
    """
    tags = {TAG_STAGE: stage, TAG_KIND: kind, TAG_ROLE: "stage", **_owner_tags()}
    if data is not None:
        tags[TAG_DATA] = data.digest
    if input_run_id:
        tags[TAG_INPUT_RUN] = input_run_id
    if teacher_run_id:
        tags[TAG_TEACHER_RUN] = teacher_run_id
    with retry.started_run(
        experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags
    ) as run:
        rid = run.info.run_id
        _opened(rid)
        try:
            retry.call(mlflow.log_params, {k[:250]: v[:6000] for k, v in flatten(params).items()})
            if data is not None:
                retry.client().log_inputs(rid, datasets=[_dataset_input(data, data_name)])
            yield rid
        except BaseException as e:
            if rid in _OPEN_RUNS:
                with contextlib.suppress(Exception):  # e.g. the disk is full: keep the cause
                    retry.call(mlflow.set_tag, TAG_ERROR, f"{type(e).__name__}: {e}"[:5000])
            raise
        finally:
            _closed(rid)


def log_runtime(**params: Any) -> None:
    retry.call(mlflow.log_params, {f"runtime.{k}": v for k, v in params.items()})


def find_build_run(experiment_id: str, build_id: str):
    """A run that logged build `build_id`'s model (the one that computed it, if it is in this
    experiment), or None. A run still RUNNING counts: a command that waited for another one's
    build finds it before it ends; FAILED and KILLED runs never do."""
    runs = retry.client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_BUILD}` = '{build_id}'",
        max_results=50,
    )
    usable = [
        r
        for r in runs
        if r.info.status in ("FINISHED", "RUNNING") and r.data.tags.get(TAG_MODEL_URI)
    ]
    usable.sort(key=lambda r: (r.data.tags.get(TAG_CACHED) != "false", r.info.start_time))
    return usable[0] if usable else None


def log_cached_result(metrics: dict[str, float], origin, build_id: str) -> str:
    """A cache hit: the same metrics, tagged cached and linked to the run that built it."""
    model_uri = origin.data.tags.get(TAG_MODEL_URI, "")
    retry.call(mlflow.log_metrics, metrics)
    retry.call(
        mlflow.set_tags,
        {
            TAG_CACHED: "true",
            TAG_CACHED_FROM: origin.data.tags.get(TAG_CACHED_FROM, origin.info.run_id),
            TAG_BUILD: build_id,
            TAG_ARTIFACT: origin.data.tags.get(TAG_ARTIFACT, ""),
            TAG_ARTIFACT_KIND: origin.data.tags.get(TAG_ARTIFACT_KIND, ""),
            TAG_MODEL_URI: model_uri,
        },
    )
    return model_uri


def _requirements(kind: str) -> list[str]:
    """Pinned pip requirements of a logged model (listed, not inferred: inference runs a
    subprocess and took 10 s per model, measured on the 2-core reference machine): Bonsai's own, and the runtime its format
    declares."""
    from importlib.metadata import version

    pkgs = ["numpy", "pandas", "pydantic", "safetensors", "onnx", "onnxruntime"]
    runtime = get_format(kind).runtime
    if runtime and runtime not in pkgs:
        pkgs.append(runtime)
    return [f"{p}=={version(p).split('+')[0]}" for p in pkgs]


def log_stage_result(
    stage: str,
    metrics: dict[str, float],
    art,
    raw_example: Any,
    history: list[dict[str, float]] | None = None,
    build_id: str = "",
    cached: bool = False,
) -> str:
    """Log the evaluator's metrics and the variant as an MLflow model named after its stage, on
    the active child run. Returns the logged model's URI.

    Every variant is logged the same way, as the pyfunc in tasks/pyfunc_model.py holding the
    Bonsai artifact: it takes raw images as the data set stores them (the input example is two
    test images) and returns class index, class name and probabilities (and each head's, for a
    multi-task model), torch, ONNX or LiteRT alike.
    The artifact's small files (manifest, reports, plots) are also run artifacts, for browsing.
    """
    import tempfile

    from mlflow.models import infer_signature

    from bonsai.predictor import Predictor

    retry.call(mlflow.log_metrics, metrics)
    for epoch, h in enumerate(history or []):
        retry.call(
            mlflow.log_metrics,
            {f"train_{k}" if not k.startswith("train") else k: v for k, v in h.items()},
            step=epoch,
        )
    retry.call(mlflow.set_tags, {TAG_ARTIFACT: art.digest, TAG_ARTIFACT_KIND: art.kind})
    if not get_format(art.kind).runs_here:  # no pyfunc (Core ML): the package as an artifact
        retry.call(mlflow.log_artifacts, str(art.path), artifact_path="bonsai_artifact")
        return f"runs:/{mlflow.active_run().info.run_id}/bonsai_artifact"  # type: ignore[union-attr]
    predictor = Predictor(art.path)
    example = np.asarray(raw_example)
    output = pd.DataFrame(predictor.columns(example))  # what the logged model's predict returns
    with warnings.catch_warnings():  # "integer columns cannot represent missing values"
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, output)
    with tempfile.TemporaryDirectory() as small, tempfile.TemporaryDirectory() as code:
        model_files = {f.model_file for f in FORMATS.values()}  # logged inside the model
        for f in Path(art.path).iterdir():
            if f.is_file() and f.name not in model_files:
                (Path(small) / f.name).write_bytes(f.read_bytes())
        retry.call(mlflow.log_artifacts, small, artifact_path="bonsai_artifact")
        # The library travels with the model (without bytecode caches), so the model loads
        # wherever Bonsai's dependencies are installed.
        library = Path(code) / "bonsai"
        shutil.copytree(
            Path(__file__).resolve().parent.parent / "bonsai",
            library,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        # Under a fixed name, so the deployable file has one path in every logged model:
        # <model>/artifacts/bonsai_artifact/model.onnx (or model.safetensors).
        bundled = Path(code) / "bonsai_artifact"
        shutil.copytree(art.path, bundled)
        info = retry.call(
            mlflow.pyfunc.log_model,
            name=stage,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"bonsai_artifact": str(bundled)},
            code_paths=[str(library)],
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(art.kind),
            metadata={"bonsai_kind": art.kind, "classes": [str(c) for c in predictor.classes]},
        )
    # Tagged last: find_build_run only links cache hits to a run whose model is logged.
    retry.call(
        mlflow.set_tags,
        {TAG_BUILD: build_id, TAG_CACHED: str(cached).lower(), TAG_MODEL_URI: info.model_uri},
    )
    return info.model_uri


def log_verdicts(metrics: dict[str, float], meta: dict[str, Any]) -> str | None:
    """On the active stage run: what a stage decided that a user filters by. A quantized
    variant slower than its fp32 parent gets the tag `bonsai.speed_guard=failed` (promotion
    refuses it); layers kept in float by accuracy-aware quantization become the param
    `float_layers`; a searched int8 variant's winning settings become `search_winner.*` params. Returns
    a warning line to log, or None."""
    if meta.get("float_layers") is not None:
        mlflow.log_param("float_layers", json.dumps(meta["float_layers"])[:6000])
    if meta.get("search_settings") is not None:  # quantize.static search: the winner's settings
        # (`search.*` already holds the stage's search config: these keys must differ)
        mlflow.log_params(
            {f"search_winner.{k}": json.dumps(v)[:6000] for k, v in meta["search_settings"].items()}
        )
    if "speed_guard_ok" not in metrics:
        return None
    ok = metrics["speed_guard_ok"] >= 1
    mlflow.set_tag("bonsai.speed_guard", "ok" if ok else "failed")
    if ok:
        return None
    return (
        f"speed guard: {metrics.get('speedup_vs_parent', float('nan')):.2f}x against its fp32 "
        "parent, measured side by side; marked speed_guard_ok=0 (promotion will not ship it)"
    )


# Per-stage numbers logged on the pipeline run (`<stage>.<key>`), for sorting runs in the UI.
HEADLINE = ("accuracy", "val_accuracy", "speedup", "size_ratio", "latency_p50_ms", "bytes")


def log_comparison(parent_run_id: str, rows: list[dict], table: str, plot: Path | None) -> None:
    client = retry.client()
    client.log_text(parent_run_id, table + "\n", "comparison.md")
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every column any row has
    client.log_table(
        parent_run_id,
        data={k: [r.get(k) for r in rows] for k in keys},
        artifact_file="comparison.json",
    )
    if plot is not None:
        client.log_artifact(parent_run_id, str(plot), "plots")
    # Per-stage headline numbers on the parent too, for sorting runs in the UI.
    now = int(time.time() * 1000)
    client.log_batch(
        parent_run_id,
        metrics=[
            Metric(f"{r['stage']}.{key}", float(r[key]), now, 0)
            for r in rows
            for key in HEADLINE
            if key in r
        ],
    )


def log_ratios(run_id: str, row: dict) -> None:
    """Ratios against the reference, measured side by side at the end, on a stage's run."""
    now = int(time.time() * 1000)
    values = {
        k: row[k]
        for k in ("accuracy_delta", "val_accuracy_delta", "agreement", "speedup", "size_ratio")
        if k in row
    }
    if "latency_p50_ms" in row:
        values["paired_latency_p50_ms"] = row["latency_p50_ms"]
    retry.client().log_batch(
        run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()]
    )
