"""The Prefect task that runs one stage, evaluates its artifact and records both in MLflow."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from bonsai import __version__
from bonsai.artifacts import atomic_dir, open_artifact
from bonsai.data import load_data
from bonsai.evaluate import evaluate
from bonsai.stages import StageContext, get_stage
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


@task(name="stage", task_run_name="{name}", retries=0)
def run_stage(
    name: str,
    kind: str,
    params: dict[str, Any],
    seed: int,
    data_cfg: dict[str, Any],
    store_dir: str,
    experiment_id: str,
    parent_run_id: str,
    eval_cfg: dict[str, Any],
    progress: bool,
    input: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run stage `name` on its input/teacher results (dicts returned by this task upstream).

    The child run is created only now, when the stage really starts: a stage whose upstream
    failed never runs and leaves no empty run behind.
    """
    log = get_run_logger()
    data = load_data(data_cfg)
    stage_cls = get_stage(kind)
    config = stage_cls.Config.model_validate(params)
    in_art = open_artifact(input["artifact"]["path"]) if input else None
    teacher_art = open_artifact(teacher["artifact"]["path"]) if teacher else None
    key = stage_key(
        kind,
        params,
        seed,
        in_art.digest if in_art else None,
        teacher_art.digest if teacher_art else None,
        data.digest,
    )
    out = Path(store_dir) / "stages" / f"{name}-{key}"
    with tracking.child_run(
        experiment_id,
        parent_run_id,
        name,
        kind,
        params,
        input["run_id"] if input else None,
        teacher["run_id"] if teacher else None,
    ) as run_id:
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
            )
            stage_cls(config).run(ctx)
        artifact = open_artifact(out)
        stage_seconds = time.perf_counter() - t0
        ev = evaluate(
            artifact,
            data,
            Path(store_dir) / "eval" / f"{name}-{key}",
            threads=eval_cfg["threads"],
            warmup=eval_cfg["warmup"],
            repeats=eval_cfg["repeats"],
            batch_size=eval_cfg["batch_size"],
        )
        metrics = {**ev.metrics, "stage_seconds": stage_seconds}
        model_uri = tracking.log_stage_result(
            metrics,
            artifact.path,
            artifact.kind,
            artifact.digest,
            data.test_x[:2].numpy(),
            artifact.meta.get("history"),
        )
        log.info(
            f"{name} ({kind}): accuracy {100 * ev.metrics['accuracy']:.2f}%, "
            f"{int(ev.metrics['bytes']):,} bytes, p50 {ev.metrics['latency_p50_ms']:.4f} ms "
            f"[{stage_seconds:.1f}s]"
        )
    return {
        "name": name,
        "kind": kind,
        "run_id": run_id,
        "artifact": artifact.ref(),
        "metrics": metrics,
        "predictions": ev.predictions.tolist(),
        "latency_model": str(ev.latency_model),
        "model_uri": model_uri,
        "seconds": time.perf_counter() - t0,
    }
