"""The Prefect tasks that run one stage: `build_stage` computes (cached by Prefect), `run_stage`
records it in MLflow (always, so that every pipeline run has one child run per stage).

Caching: `build_stage`'s key is the stage's resolved config + the digests of its input and
teacher artifacts + the data digest + the library version (`StageCachePolicy`). Its result, a
JSON record of the artifact and its evaluation, persists under `<store>/prefect/`, so a later
process with the same key skips the work. The artifact it points to is verified (checksums) on
every hit; a missing or corrupted one is rebuilt (`refresh_cache`), as is a stage the user
forces (`runtime.force`).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy

from bonsai import __version__
from bonsai.artifacts import atomic_dir, open_artifact
from bonsai.data import load_data
from bonsai.errors import ArtifactError
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


def _digest(ref: dict[str, Any] | None) -> str | None:
    return ref["artifact"]["digest"] if ref else None


def key_for(inputs: dict[str, Any]) -> str:
    """`<stage name>-<stage_key>` from `build_stage`'s inputs."""
    data = load_data(inputs["data_cfg"])  # cached per process
    key = stage_key(
        inputs["kind"],
        inputs["params"],
        inputs["seed"],
        _digest(inputs.get("input")),
        _digest(inputs.get("teacher")),
        data.digest,
    )
    return f"{inputs['name']}-{key}"


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache key of a stage build: see `stage_key`. Upstream artifacts enter through
    their digests, so any upstream change invalidates everything downstream."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        return key_for(inputs)


def prefect_dirs(store_dir: str) -> tuple[Path, Path]:
    """(cache-key records, result values) under the store."""
    base = Path(store_dir) / "prefect"
    return base / "cache-keys", base / "results"


@task(
    name="build",
    task_run_name="build-{name}",
    persist_result=True,
    result_serializer="json",  # plain data, never pickle
)
def build_stage(
    name: str,
    kind: str,
    params: dict[str, Any],
    seed: int,
    data_cfg: dict[str, Any],
    store_dir: str,
    eval_cfg: dict[str, Any],
    progress: bool,
    input: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the stage into `<store>/stages/<name>-<key>/` (atomically) and evaluate the result."""
    log = get_run_logger()
    data = load_data(data_cfg)
    stage_cls = get_stage(kind)
    config = stage_cls.Config.model_validate(params)
    in_art = open_artifact(input["artifact"]["path"]) if input else None
    teacher_art = open_artifact(teacher["artifact"]["path"]) if teacher else None
    key = key_for(
        {
            "name": name,
            "kind": kind,
            "params": params,
            "seed": seed,
            "data_cfg": data_cfg,
            "input": input,
            "teacher": teacher,
        }
    )
    out = Path(store_dir) / "stages" / key
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
    stage_seconds = time.perf_counter() - t0
    artifact = open_artifact(out)
    result = {
        "name": name,
        "kind": kind,
        "key": key,
        "build_id": uuid.uuid4().hex,  # identifies this computation across cache hits
        "artifact": artifact.ref(),
        "history": artifact.meta.get("history"),
    }
    return {**result, **_evaluation(artifact, data, store_dir, key, eval_cfg, stage_seconds)}


def _evaluation(artifact, data, store_dir: str, key: str, eval_cfg: dict, stage_seconds: float):
    """The evaluator's results for an artifact, and the eval settings they were measured with."""
    ev = evaluate(
        artifact,
        data,
        Path(store_dir) / "eval" / key,
        threads=eval_cfg["threads"],
        warmup=eval_cfg["warmup"],
        repeats=eval_cfg["repeats"],
        batch_size=eval_cfg["batch_size"],
    )
    return {
        "metrics": {**ev.metrics, "stage_seconds": stage_seconds},
        "predictions": ev.predictions.tolist(),
        "latency_model": str(ev.latency_model),
        "eval_cfg": eval_cfg,
    }


def _usable(built: dict[str, Any]) -> bool:
    """A cached build is usable only if its artifact still verifies and its timed model exists."""
    try:
        art = open_artifact(built["artifact"]["path"])
    except ArtifactError:
        return False
    return art.digest == built["artifact"]["digest"] and Path(built["latency_model"]).is_file()


@task(name="stage", task_run_name="{name}")
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
    force: bool = False,
    input: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) stage `name` on its input/teacher results and record it as a child run.

    The child run is created only when the stage really starts: a stage whose upstream failed
    never runs and leaves no empty run behind.
    """
    import torch

    log = get_run_logger()
    keys, _ = prefect_dirs(store_dir)
    policy = StageCachePolicy().configure(key_storage=keys)
    args = (name, kind, params, seed, data_cfg, store_dir, eval_cfg, progress)
    t0 = time.perf_counter()
    with tracking.child_run(
        experiment_id,
        parent_run_id,
        name,
        kind,
        params,
        input["run_id"] if input else None,
        teacher["run_id"] if teacher else None,
    ) as run_id:
        tracking.log_runtime(
            torch_threads=torch.get_num_threads(),
            eval_threads=eval_cfg["threads"],
            eval_repeats=eval_cfg["repeats"],
        )
        build = build_stage.with_options(cache_policy=policy, refresh_cache=force)
        built = build(*args, input=input, teacher=teacher)
        if not _usable(built):
            log.warning(f"{name}: cached artifact missing or modified; rebuilding")
            built = build_stage.with_options(cache_policy=policy, refresh_cache=True)(
                *args, input=input, teacher=teacher
            )
        if built.get("eval_cfg") != eval_cfg:
            # Same artifact, other measurement settings (e.g. eval.threads): re-measure only.
            built = {
                **built,
                **_evaluation(
                    open_artifact(built["artifact"]["path"]),
                    load_data(data_cfg),
                    store_dir,
                    built["key"],
                    eval_cfg,
                    built["metrics"]["stage_seconds"],
                ),
            }
        origin = tracking.find_build_run(experiment_id, built["build_id"])
        if origin is None:
            model_uri = tracking.log_stage_result(
                built["metrics"],
                Path(built["artifact"]["path"]),
                built["artifact"]["kind"],
                built["artifact"]["digest"],
                load_data(data_cfg).test_x[:2].numpy(),
                built["history"],
                build_id=built["build_id"],
            )
            how = f"[{built['metrics']['stage_seconds']:.1f}s]"
        else:
            model_uri = tracking.log_cached_result(built["metrics"], origin, built["build_id"])
            how = f"[cached from run {origin.info.run_id}]"
        m = built["metrics"]
        log.info(
            f"{name} ({kind}): accuracy {m['accuracy']:.2f}%, {int(m['bytes']):,} bytes, "
            f"p50 {m['latency_p50_ms']:.4f} ms {how}"
        )
    return {
        **built,
        "run_id": run_id,
        "model_uri": model_uri,
        "cached": origin is not None,
        "seconds": time.perf_counter() - t0,
    }
