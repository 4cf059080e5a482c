"""The Prefect task that runs one stage: build it (or reuse its build) and evaluate it through
`bonsai.build` (the cache, its keys and records: see there), and record it in MLflow as a child
run of the pipeline run.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bonsai.artifacts import open_artifact
from bonsai.build import build_or_reuse, stage_key
from bonsai.data import load_data
from bonsai.devices import resolve_device
from bonsai.errors import BonsaiError
from bonsai.stages import get_stage
from bonsai.store import Store, full_disk_error, is_disk_full, key_lock
from tasks import tracking


def _digest(ref: dict[str, Any] | None) -> str | None:
    return ref["artifact"]["digest"] if ref else None


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
    # Resolved where the stage runs (this process, or a Dask worker); not part of the key.
    device = str(resolve_device(run.get("device", "cpu")))
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
                device=run.get("device", "cpu"),  # as requested: auto, cpu, cuda, mps
                device_resolved=device,  # what this command trains on (a cached build's
                # own device is its manifest's `trained_on`)
            )

            def waiting() -> None:
                log.info(f"{name}: another process is building {key}; waiting to reuse it")

            with key_lock(store, key, on_wait=waiting):
                record, art, built = build_or_reuse(
                    store, key, name, kind, params, seed, data, eval_cfg,
                    input=open_artifact(input["artifact"]["path"]) if input else None,
                    input_key=input["key"] if input else None,
                    teacher=open_artifact(teacher["artifact"]["path"]) if teacher else None,
                    progress=run["progress"], force=force, log=log.info, warn=log.warning,
                    device=device,
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
