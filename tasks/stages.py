"""The Prefect task that runs one stage: build it (or reuse its build), evaluate it, record it in
MLflow as a child run.

Caching: a stage's key is its resolved config + the digests of its input and teacher artifacts +
the data digest + the library version (`stage_key`). A finished build leaves a record under
`<store>/records/<key>.json` (see `bonsai.store` for why these are Bonsai's own JSON records and
not Prefect's result cache). A later command with the same key reuses the build when the record
validates and the artifact at `<store>/stages/<key>/` verifies against it; anything else is a
miss and the stage is rebuilt. Commands that need the same key at the same time build it once:
the first takes the key's lock, the others wait for it and then reuse the build.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bonsai import __version__
from bonsai.artifacts import Artifact, atomic_dir, open_artifact, sha256_file
from bonsai.data import DataBundle, load_data
from bonsai.errors import BonsaiError
from bonsai.evaluate import evaluate
from bonsai.stages import StageContext, get_stage
from bonsai.store import (
    Evaluation,
    StageRecord,
    Store,
    evaluation_usable,
    full_disk_error,
    is_disk_full,
    key_lock,
    read_record,
    verify_build,
    write_record,
)
from tasks import tracking


def stage_key(
    kind: str,
    params: dict[str, Any],
    seed: int,
    input_digest: str | None,
    teacher_digest: str | None,
    data_digest: str,
) -> str:
    """What determines a stage's output: its config, its inputs' digests, the data, the library."""
    blob = json.dumps(
        {
            "kind": kind,
            "params": params,
            "seed": seed,
            "input": input_digest,
            "teacher": teacher_digest,
            "data": data_digest,
            "bonsai": __version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _digest(ref: dict[str, Any] | None) -> str | None:
    return ref["artifact"]["digest"] if ref else None


def _evaluate(
    store: Store, key: str, art: Artifact, data: DataBundle, eval_cfg: dict
) -> Evaluation:
    t0 = time.perf_counter()
    ev = evaluate(
        art,
        data,
        store.eval_dir(key),
        threads=eval_cfg["threads"],
        warmup=eval_cfg["warmup"],
        repeats=eval_cfg["repeats"],
        batch_size=eval_cfg["batch_size"],
        footprint=eval_cfg.get("footprint", True),
    )
    return Evaluation(
        settings=dict(eval_cfg),
        metrics=ev.metrics,
        predictions=ev.predictions.tolist(),
        latency_sha256=sha256_file(ev.latency_model),
        seconds=time.perf_counter() - t0,
    )


def _build(
    store: Store,
    key: str,
    name: str,
    kind: str,
    params: dict[str, Any],
    seed: int,
    data: DataBundle,
    progress: bool,
    input: dict[str, Any] | None,
    teacher: dict[str, Any] | None,
    log,
) -> tuple[Artifact, float]:
    """Run the stage into `<store>/stages/<key>/`, atomically."""
    stage_cls = get_stage(kind)
    config = stage_cls.Config.model_validate(params)
    in_art = open_artifact(input["artifact"]["path"]) if input else None
    input_onnx = None
    if input is not None and in_art is not None and in_art.kind == "torch":
        upstream, _ = read_record(store, input["key"])
        timed = store.latency_model(input["key"], "torch")
        if (
            upstream is not None
            and upstream.artifact_digest == in_art.digest
            and timed.is_file()
            and sha256_file(timed) == upstream.evaluation.latency_sha256
        ):
            input_onnx = timed  # the evaluator's verified export of exactly this model
    teacher_art = open_artifact(teacher["artifact"]["path"]) if teacher else None
    out = store.stage_dir(key)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        ctx = StageContext(
            name=name,
            data=data,
            out_dir=tmp,
            input=in_art,
            teacher=teacher_art,
            seed=seed,
            progress=progress,
            log=log.info,
            input_onnx=input_onnx,
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
    progress: bool,
    force: bool,
    input: dict[str, Any] | None,
    teacher: dict[str, Any] | None,
    log,
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
                update={"evaluation": _evaluate(store, key, art, data, eval_cfg)}
            )
            write_record(store, record)
        return record, art, False
    if why not in ("no record", "forced"):
        log.warning(f"{name}: cached result not usable ({why}); rebuilding")
    art, seconds = _build(store, key, name, kind, params, seed, data, progress, input, teacher, log)
    record = StageRecord(
        key=key,
        name=name,
        kind=kind,
        build_id=uuid.uuid4().hex,
        artifact_digest=art.digest,
        stage_seconds=seconds,
        evaluation=_evaluate(store, key, art, data, eval_cfg),
    )
    write_record(store, record)
    return record, art, True


@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(
    name: str,
    kind: str,
    params: dict[str, Any],
    seed: int,
    run: dict[str, Any],
    force: bool = False,
    input: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) stage `name` on its input/teacher results and record it as a child run of
    `run["parent_run_id"]` (`run` holds what every stage of the pipeline run shares).

    The child run is created only when the stage really starts: a stage whose upstream failed
    never runs and leaves no empty run behind. The key's lock is held until the child run has
    logged the model, so a command waiting for this build finds the run to link its cache hit to.
    """
    import torch

    log = get_run_logger()
    store = Store(run["store_dir"])
    data_cfg, eval_cfg = run["data_cfg"], run["eval_cfg"]
    experiment_id = run["experiment_id"]
    data = load_data(data_cfg)
    key = f"{name}-{stage_key(kind, params, seed, _digest(input), _digest(teacher), data.digest)}"
    # Every knob the stage runs with, defaults included, and the columns users sort by.
    knobs = {
        "stage": name,
        "kind": kind,
        "pipeline": run["pipeline"],
        "input": input["name"] if input else "",
        "teacher": teacher["name"] if teacher else "",
        **get_stage(kind).Config.model_validate(params).model_dump(mode="json"),
    }
    t0 = time.perf_counter()
    with tracking.child_run(
        experiment_id,
        run["parent_run_id"],
        f"{name} · {run['parent_name']}",
        name,
        kind,
        knobs,
        input["run_id"] if input else None,
        teacher["run_id"] if teacher else None,
        data,
        data_cfg["name"],
    ) as run_id:
        try:
            tracking.log_runtime(
                torch_threads=torch.get_num_threads(),
                eval_threads=eval_cfg["threads"],
                eval_repeats=eval_cfg["repeats"],
            )

            def waiting() -> None:
                log.info(f"{name}: another process is building {key}; waiting to reuse it")

            with key_lock(store, key, on_wait=waiting):
                record, art, built = build_or_reuse(
                    store, key, name, kind, params, seed, data, eval_cfg, run["progress"],
                    force, input, teacher, log,
                )  # fmt: skip
                metrics = {
                    **record.evaluation.metrics,
                    "stage_seconds": record.stage_seconds,
                    "eval_seconds": record.evaluation.seconds,
                }
                origin = None if built else tracking.find_build_run(experiment_id, record.build_id)
                if origin is None:
                    model_uri = tracking.log_stage_result(
                        name,
                        metrics,
                        art,
                        data.raw_test[:2],
                        art.meta.get("history"),
                        build_id=record.build_id,
                        cached=not built,
                    )
                    how = f"[{record.stage_seconds:.1f}s]" if built else "[cached]"
                else:
                    model_uri = tracking.log_cached_result(metrics, origin, record.build_id)
                    how = f"[cached from run {origin.info.run_id}]"
                if warning := tracking.log_verdicts(metrics, art.meta):
                    log.warning(f"{name}: {warning}")
        except BonsaiError:
            raise
        except Exception as e:
            if is_disk_full(e):
                raise full_disk_error(store.root, e) from e
            raise
        if "accuracy" in metrics:
            log.info(
                f"{name} ({kind}): accuracy {metrics['accuracy']:.2f}%, "
                f"{int(metrics['bytes']):,} bytes, p50 {metrics['latency_p50_ms']:.4f} ms {how}"
            )
        else:  # Core ML: cannot run here
            log.info(
                f"{name} ({kind}): {int(metrics['bytes']):,} bytes ({art.kind} does not run "
                f"on this machine: no accuracy or latency) {how}"
            )
    return {
        "name": name,
        "kind": kind,
        "key": key,
        "build_id": record.build_id,
        "artifact": art.ref(),
        "history": art.meta.get("history"),
        "metrics": metrics,
        "predictions": record.evaluation.predictions,
        "latency_model": str(store.latency_model(key, art.kind)),
        "run_id": run_id,
        "model_uri": model_uri,
        "cached": not built,
        "seconds": time.perf_counter() - t0,
    }
