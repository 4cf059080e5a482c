"""Run one stage through the store's cache, without an orchestrator: key, build or reuse, evaluate.

    store = Store("mlruns")
    teacher = run_stage(store, "teacher", "train", {"model": {"name": "cnn"}, "epochs": 3}, data)
    onnx = run_stage(store, "onnx", "export.onnx", {}, data, input=teacher)
    onnx.record.evaluation.metrics["accuracy"]

A stage's key is its resolved config + the digests of its input and teacher artifacts + the data
digest + the library version (`stage_key`). The device a stage trains on (`runtime.device`) is
not in the key: it is where the recipe runs, not the recipe (as the thread count is), so a
teacher trained on a GPU is reused by a later CPU command and vice versa. It is recorded in the
artifact's manifest instead (`trained_on`), and in each stage's MLflow run. A finished build leaves a record under
`<store>/records/<key>.json` (`bonsai.store` says why these are Bonsai's own JSON records and not
Prefect's result cache). A later call with the same key reuses the build when the record
validates and the artifact at `<store>/stages/<key>/` verifies against it; anything else is a
miss and the stage is rebuilt. Processes that need the same key at the same time build it once:
the first takes the key's lock, the others wait for it and then reuse the build.

`tasks/stages.py` wraps `build_or_reuse` in a Prefect task that also records the stage in MLflow
(holding the key's lock until the run has logged the model); benches and tests call `run_stage`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonsai import __version__
from bonsai.artifacts import Artifact, atomic_dir, open_artifact, sha256_file
from bonsai.data import DataBundle
from bonsai.devices import resolve_device
from bonsai.formats import get_format
from bonsai.measure import latency
from bonsai.measure.evaluate import evaluate
from bonsai.stages import StageContext, get_stage
from bonsai.store import (
    EvaluationRecord,
    StageRecord,
    Store,
    evaluation_usable,
    key_lock,
    read_record,
    verify_build,
    write_record,
)

# The evaluator's settings when a caller gives none (those of `conf/config.yaml`'s eval).
DEFAULT_EVAL = {
    "threads": latency.THREADS,
    "warmup": latency.WARMUP,
    "repeats": latency.REPEATS,
    "batch_size": 256,
    "footprint": True,
}


def stage_key(
    kind: str,
    params: dict[str, Any],
    seed: int,
    input_digest: str | None,
    teacher_digest: str | None,
    data_digest: str,
) -> str:
    """What determines a stage's output: its config, its inputs' digests, the data, the library.
    The config as the stage's `key_params` gives it: a stage reading a file outside the store
    (`import`) keys on the file's content, not its path."""
    blob = json.dumps(
        {
            "kind": kind,
            "params": get_stage(kind).key_params(params),
            "seed": seed,
            "input": input_digest,
            "teacher": teacher_digest,
            "data": data_digest,
            "bonsai": __version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evaluate_build(
    store: Store, key: str, art: Artifact, data: DataBundle, eval_cfg: dict[str, Any]
) -> EvaluationRecord:
    """Measure `art` with the one evaluator; the evaluator's files go to `<store>/eval/<key>/`."""
    t0 = time.perf_counter()
    ev = evaluate(
        art,
        data,
        store.writable_dir(store.eval_dir(key)),
        threads=eval_cfg["threads"],
        warmup=eval_cfg["warmup"],
        repeats=eval_cfg["repeats"],
        batch_size=eval_cfg["batch_size"],
        footprint=eval_cfg.get("footprint", True),
    )
    return EvaluationRecord(
        settings=dict(eval_cfg),
        metrics=ev.metrics,
        predictions=ev.predictions.tolist(),
        latency_sha256=sha256_file(ev.latency_model),
        seconds=time.perf_counter() - t0,
    )


def timed_export(store: Store, input_key: str, in_art: Artifact) -> Path | None:
    """The evaluator's verified ONNX export of exactly this torch input (a format the evaluator
    times through an export), if there is one (an export stage then reuses it instead of
    exporting again)."""
    if get_format(in_art.kind).latency_file is None:  # not a torch module: nothing exported
        return None
    upstream, _ = read_record(store, input_key)
    timed = store.latency_model(input_key, in_art.kind)
    if (
        upstream is not None
        and upstream.artifact_digest == in_art.digest
        and timed.is_file()
        and sha256_file(timed) == upstream.evaluation.latency_sha256
    ):
        return timed
    return None


def build(
    store: Store,
    key: str,
    name: str,
    kind: str,
    params: dict[str, Any],
    seed: int,
    data: DataBundle,
    *,
    input: Artifact | None = None,
    input_key: str | None = None,
    teacher: Artifact | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> tuple[Artifact, float]:
    """Run the stage into `<store>/stages/<key>/`, atomically; (artifact, seconds).
    `input_key` (the input's own key in this store, when it has one) finds the evaluator's
    export of a torch input, which an export stage then reuses. `device`: a resolved torch
    device string (`bonsai.devices.resolve_device`) the stage trains on."""
    stage_cls = get_stage(kind)
    config = stage_cls.Config.model_validate(params)
    out = store.stage_dir(key)
    store.writable_dir(out.parent)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        ctx = StageContext(
            name=name,
            data=data,
            out_dir=tmp,
            input=input,
            teacher=teacher,
            seed=seed,
            progress=progress,
            log=log,
            input_onnx=timed_export(store, input_key, input) if input and input_key else None,
            device=device,
        )
        stage_cls(config).run(ctx)
    return open_artifact(out), time.perf_counter() - t0


def build_or_reuse(
    store: Store,
    key: str,
    name: str,
    kind: str,
    params: dict[str, Any],
    seed: int,
    data: DataBundle,
    eval_cfg: dict[str, Any],
    *,
    input: Artifact | None = None,
    input_key: str | None = None,
    teacher: Artifact | None = None,
    progress: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> tuple[StageRecord, Artifact, bool]:
    """(record, artifact, built now?) for `key`; call with the key's lock held."""
    record, why = (None, "forced") if force else read_record(store, key)
    art = None
    if record is not None:
        art, why = verify_build(store, record)
        if art is None:
            record = None
    if record is not None and art is not None:
        if not evaluation_usable(store, record, art.kind, eval_cfg):
            # Same artifact, other measurement settings or a damaged timed model: re-measure.
            record = record.model_copy(
                update={"evaluation": evaluate_build(store, key, art, data, eval_cfg)}
            )
            write_record(store, record)
        return record, art, False
    if why not in ("no record", "forced"):
        (warn or log)(f"{name}: cached result not usable ({why}); rebuilding")
    art, seconds = build(
        store, key, name, kind, params, seed, data,
        input=input, input_key=input_key, teacher=teacher, progress=progress, log=log,
        device=device,
    )  # fmt: skip
    record = StageRecord(
        key=key,
        name=name,
        kind=kind,
        build_id=uuid.uuid4().hex,
        artifact_digest=art.digest,
        stage_seconds=seconds,
        evaluation=evaluate_build(store, key, art, data, eval_cfg),
    )
    write_record(store, record)
    return record, art, True


@dataclass(frozen=True)
class Built:
    """One stage's outcome: what `run_stage` returns and takes as a later stage's input."""

    key: str
    artifact: Artifact
    record: StageRecord | None  # None: built without evaluation (`run_stage(evaluate=False)`)
    built: bool  # False: reused from the store

    @property
    def metrics(self) -> dict[str, float]:
        if self.record is None:
            raise ValueError(f"{self.key} was built without evaluation: it has no metrics")
        return self.record.evaluation.metrics


def run_stage(
    store: Store | str | Path,
    name: str,
    kind: str,
    params: dict[str, Any],
    data: DataBundle,
    *,
    input: Built | Artifact | None = None,
    teacher: Built | Artifact | None = None,
    seed: int = 0,
    eval_cfg: dict[str, Any] | None = None,
    evaluate: bool = True,
    force: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> Built:
    """Build stage `name` of `kind` (or reuse its build from `store`) and evaluate it: the same
    key, cache and evaluation as a pipeline run's stage, with no Prefect and no MLflow.

    `input` and `teacher` are earlier `Built`s, or artifacts from elsewhere. `evaluate=False`
    builds without measuring (tests, and benches that time the stage alone), every time: no
    record is written, and without a record nothing proves that a folder found at the key is
    the build that key made (the record holds its digest). `device`: `runtime.device`'s
    values (auto, cpu, cuda, mps; ConfigError when the machine has no such device)."""
    device = str(resolve_device(device))
    store = store if isinstance(store, Store) else Store(store)
    in_art = input.artifact if isinstance(input, Built) else input
    teacher_art = teacher.artifact if isinstance(teacher, Built) else teacher
    digest = stage_key(
        kind,
        params,
        seed,
        in_art.digest if in_art else None,
        teacher_art.digest if teacher_art else None,
        data.digest,
    )
    key = f"{name}-{digest}"
    input_key = input.key if isinstance(input, Built) else None  # an artifact from elsewhere: none
    with key_lock(store, key, on_wait=lambda: log(f"{name}: another process is building it")):
        if not evaluate:
            art, _ = build(
                store, key, name, kind, params, seed, data,
                input=in_art, input_key=input_key, teacher=teacher_art, progress=progress, log=log,
                device=device,
            )  # fmt: skip
            return Built(key, art, None, True)
        record, art, built = build_or_reuse(
            store, key, name, kind, params, seed, data, {**DEFAULT_EVAL, **(eval_cfg or {})},
            input=in_art, input_key=input_key, teacher=teacher_art, progress=progress, force=force,
            log=log, device=device,
        )  # fmt: skip
    return Built(key, art, record, built)
