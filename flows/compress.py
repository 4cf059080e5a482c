"""Compose config -> validate -> build the stage DAG -> run it -> compare -> report.

python -m flows.compress                                   # the default pipeline on digits
python -m flows.compress teacher=mobilenet_v3_small pipeline.stages.student.temperature=2
python -m flows.compress -m pipeline.stages.student.alpha=0.5,0.9   # a sweep
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (environment defaults, before prefect is imported)
from flows.cli import (
    Outcome,
    quiet_user_errors,
    run_app,
    say,
    start_prefect_server,
    stop_on_signals,
)
from flows.compose import CONF_DIR, compose_config

__all__ = ["CONF_DIR", "compose_config", "compress", "prepare", "apply_caps", "main"]


def prepare(raw: dict[str, Any]):
    """Apply run-wide caps, then validate config, graph, store, models and data: everything that
    can fail before any compute, Prefect task or MLflow run starts, cheapest first."""
    from bonsai.config import validate_config
    from bonsai.data import expected_input, load_data
    from bonsai.devices import resolve_device
    from tasks.mlflow_backend import check_store

    raw = apply_caps(raw)
    cfg, plan = validate_config(raw)
    resolve_device(cfg.runtime.device)  # runtime.device=cuda without a GPU: refused here
    check_store(cfg.tracking.uri, cfg.tracking.store_dir)
    expected = expected_input(cfg.data)
    if expected is not None:  # before a decode that can take minutes
        _check_models(plan, *expected)
    data = load_data(cfg.data)
    if expected != (data.input_shape, data.num_outputs):
        _check_models(plan, data.input_shape, data.num_outputs)
    return raw, cfg, plan, data


def _check_models(plan, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Build every model a stage declares and run a zero batch through it (`num_classes`: the
    logit columns, every head's in a multi-task run)."""
    from bonsai.models import check_fits_data
    from bonsai.preflight import check_stage_models

    for s in plan.stages:
        spec = getattr(s.config, "model", None)
        # torchvision families adapt their stem and head to any channels and classes, and pool
        # adaptively; the check matters for the cnn family and user modules (`_target_`).
        if spec is not None and (spec.get("_target_") or spec.get("name") == "cnn"):
            check_fits_data(spec, input_shape, num_classes, f"pipeline.stages.{s.name}.model")
    # Stage checks that need the models built (layer names, channel counts).
    check_stage_models(plan, input_shape, num_classes)


def apply_caps(raw: dict[str, Any]) -> dict[str, Any]:
    """`runtime.max_epochs` (set by `debug=fast`) caps every stage's `epochs`."""
    runtime = raw.get("runtime") or {}
    cap = runtime.get("max_epochs")
    if cap is None:
        return raw
    stages = {}
    for name, spec in (raw.get("pipeline", {}).get("stages") or {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("epochs"), int):
            spec = {**spec, "epochs": min(spec["epochs"], cap)}
        stages[name] = spec
    return {**raw, "pipeline": {**raw["pipeline"], "stages": stages}}


def _device(cfg) -> str:
    """`runtime.device` resolved on this machine: cpu, cuda:0, mps."""
    from bonsai.devices import resolve_device

    return str(resolve_device(cfg.runtime.device))


def _threads(cfg, plan) -> tuple[int, int]:
    """(concurrent stages, torch threads per stage): their product never exceeds the CPUs."""
    cpus = cfg.runtime.cpus or len(os.sched_getaffinity(0))
    workers = max(1, min(cfg.runtime.max_workers, plan.width(), cpus))
    return workers, max(1, cpus // workers)


def _run_pipeline(prepared: tuple, overrides: list[str]) -> dict[str, Any]:
    """The flow's body, on the config `prepare` already validated."""
    from prefect import get_run_logger

    from bonsai.artifacts import remove_stale_temp
    from bonsai.data import data_set_name
    from tasks import tracking
    from tasks.compare import compare_variants
    from tasks.mlflow_backend import init_store

    log = get_run_logger()
    raw, cfg, plan, data = prepared
    t0 = time.perf_counter()
    uri, exp_id = init_store(cfg.tracking.uri, cfg.tracking.store_dir, cfg.tracking.experiment)
    # A new store's MLflow tables take seconds to create: say when the wait is over.
    log.info(f"MLflow store ready in {time.perf_counter() - t0:.1f} s ({uri})")
    store_dir = str(Path(cfg.tracking.store_dir).resolve())
    reaped = tracking.reap_orphans(exp_id)
    if reaped:
        log.warning(f"marked {len(reaped)} run(s) left RUNNING by a dead process as KILLED")
    for folder in ("stages", "eval", "records"):
        remove_stale_temp(Path(store_dir) / folder)
        for sub in (Path(store_dir) / folder).glob("*/"):
            remove_stale_temp(sub)
    parent, parent_name = tracking.start_parent(
        exp_id,
        cfg.pipeline.name,
        raw,
        overrides,
        data,
        data_set_name(cfg.data),
        params={"runtime.device_resolved": _device(cfg)},
    )
    log.info(f"pipeline {parent_name}: {' -> '.join(plan.names())} (MLflow run {parent})")
    data_cfg = cfg.data.model_dump()
    eval_cfg = cfg.eval.model_dump()
    # What every stage task needs to know about this pipeline run.
    run = {
        "experiment_id": exp_id,
        "parent_run_id": parent,
        "parent_name": parent_name,
        "pipeline": cfg.pipeline.name,
        "store_dir": store_dir,
        "data_cfg": data_cfg,
        "eval_cfg": eval_cfg,
        "progress": cfg.runtime.progress,
        # As requested (auto, cpu, cuda, mps): each stage task resolves it where it runs (a
        # Dask worker may be another machine).
        "device": cfg.runtime.device,
    }
    t0 = time.perf_counter()
    try:
        futures = _run_stages(plan, cfg.seed, run)
        failed = [
            n for n in plan.names() if n not in futures or not _state(futures[n]).is_completed()
        ]
        if failed:
            _raise_first_failure(plan, futures, failed)
        results = {n: f.result() for n, f in futures.items()}
        cmp = compare_variants(
            list(results.values()), plan.reference, data_cfg, eval_cfg, parent, parent_name
        )
        tracking.end_run(parent, "FINISHED")
    except BaseException as e:
        tracking.end_run(parent, "FAILED", f"{type(e).__name__}: {e}")
        raise
    promotion = None
    if cfg.promote is not None:
        from tasks.promote import promote

        promotion = promote(
            cfg.promote.model_dump(mode="json"), exp_id, parent, store_dir, eval_cfg
        )
    from prefect.runtime import flow_run

    return {
        "parent_run_id": parent,
        "parent_name": parent_name,
        "flow_run_id": str(flow_run.id),
        "experiment_id": exp_id,
        "tracking_uri": uri,
        "table": cmp["table"],
        "rows": cmp["rows"],
        "reference": plan.reference,  # the stage the rows' ratios are against
        "stages": {
            n: {k: r[k] for k in ("run_id", "key", "seconds", "metrics", "artifact", "cached")}
            for n, r in results.items()
        },
        "seconds": time.perf_counter() - t0,
        "promotion": promotion,
    }


def _run_stages(plan, seed: int, run: dict[str, Any]) -> dict[str, Any]:
    """Submit each stage once its input and teacher stages have finished, passing their results
    (not their futures): a future passed while its task still runs makes Prefect record that
    task as the new one's parent and draw the chain as nesting. Results are tracked by Prefect,
    so the dependency still shows as an edge. Independent stages run at once; a stage whose
    upstream failed is never submitted. Returns the futures of the submitted stages."""
    from tasks.stages import run_stage

    futures: dict[str, Any] = {}
    skipped: set[str] = set()
    waiting = list(plan.stages)  # in dependency order

    def done(name: str) -> bool:
        return name in futures and _finished(futures[name])

    def failed(name: str) -> bool:
        return name in skipped or (done(name) and not _state(futures[name]).is_completed())

    def completed(name: str) -> bool:
        return done(name) and _state(futures[name]).is_completed()

    while waiting or not all(_finished(f) for f in futures.values()):
        for s in list(waiting):
            deps = [d for d in (s.input, s.teacher) if d]
            if any(failed(d) for d in deps):
                waiting.remove(s)  # an upstream stage failed: this one never runs
                skipped.add(s.name)
            elif all(completed(d) for d in deps):
                futures[s.name] = run_stage.submit(
                    s.name,
                    s.kind,
                    s.params,
                    s.seed(seed),
                    run,
                    force=plan.forced(s.name),
                    input=futures[s.input].result() if s.input else None,
                    teacher=futures[s.teacher].result() if s.teacher else None,
                )
                waiting.remove(s)
        time.sleep(0.05)
    return futures


def _finished(future: Any) -> bool:
    """Whether a stage's future is done, asked of the future itself. Not `future.state`: until
    the run is final, every read of it is a request to the Prefect API, and polling it every
    50 ms kept the temporary server at a quarter of a core for the whole run."""
    wrapped = getattr(future, "wrapped_future", None)
    return wrapped.done() if wrapped is not None else future.state.is_final()


def _state(future: Any) -> Any:
    """The final state of a finished stage's future (read once, then kept by the future)."""
    future.wait()
    return future.state


def _raise_first_failure(plan, futures, failed: list[str]) -> None:
    from bonsai.errors import StageFailed

    for name in plan.names():  # dependency order: the root cause first
        if name not in failed or name not in futures:  # not in futures: never submitted
            continue
        try:
            futures[name].result()
        except Exception as e:  # noqa: BLE001 - re-raised with the stage named
            skipped = [n for n in failed if n != name]
            tail = f"; not run: {', '.join(skipped)}" if skipped else ""
            raise StageFailed(
                f"stage {name!r} ({plan[name].kind}) failed: {type(e).__name__}: {e}{tail}"
            ) from e
    raise StageFailed(f"stages did not complete: {', '.join(failed)}")


def compress(config: dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline `config` describes (a plain, resolved dict) as a Prefect flow."""
    t0 = time.perf_counter()
    prepared = prepare(config)
    _, cfg, plan, data = prepared
    from bonsai.devices import describe

    device = _device(cfg)
    where = "" if device == "cpu" else f"; training on {describe(device)}"
    say(
        f"checked the configuration, store, data ({data.train_x.shape[0]} train, "
        f"{data.val_x.shape[0]} validation and {data.test_x.shape[0]} test images) and models "
        f"in {time.perf_counter() - t0:.1f} s{where}"
    )
    import torch
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    workers, threads = _threads(cfg, plan)
    torch.set_num_threads(threads)  # process-wide: set once, before any stage runs
    quiet_user_errors()
    runner: Any = ThreadPoolTaskRunner(max_workers=workers)
    api: Any = contextlib.nullcontext()
    if cfg.runtime.task_runner == "dask":  # stages in Dask worker processes, same thread rule
        from tasks.dask_runner import dask_task_runner, prefect_api_for_workers
        from tasks.mlflow_backend import store_uri

        tracking_uri = store_uri(cfg.tracking.uri, cfg.tracking.store_dir)
        runner = dask_task_runner(cfg.runtime.dask_address, workers, threads, tracking_uri)
        api = prefect_api_for_workers()

    # Prefect's overloads for flow(fn, **options) reject a typed task runner: hence the ignore.
    def compress_flow(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
        # `config` is the flow's parameter as Prefect records it; the body runs on its validated
        # form. Signal handlers again: Prefect's engine installs its own for the flow run.
        with stop_on_signals():
            return _run_pipeline(prepared, overrides)

    f = flow(  # type: ignore[call-overload]
        compress_flow,
        name="compress",
        task_runner=runner,
        validate_parameters=False,
    )
    start_prefect_server()
    with api:
        return f(prepared[0], list(overrides or []))


def report(result: dict[str, Any]) -> str:
    uri = result["tracking_uri"]
    return (
        f"\n{result['table']}\n\n"
        f"acc % is the test split's, val % the validation split's (what quantization gates "
        f"and promotion decide by); "
        f"Δacc, agreement, speedup and size are against the reference stage; latency is "
        f"batch 1 in the variant's runtime (onnxruntime; LiteRT's interpreter for LiteRT), "
        f"measured side by side.\n"
        f"Pipeline run {result['parent_run_id']} finished in {result['seconds']:.1f} s.\n"
        f"Compare the runs in the MLflow UI:\n    mlflow ui --backend-store-uri {uri}\n"
    )


def _job(config: dict[str, Any], overrides: list[str]) -> str | Outcome:
    from bonsai.errors import NothingToPromote
    from flows.search import current_direction, objective

    result = compress(config, overrides)
    text = report(result)
    promotion = result.get("promotion")
    if current_direction() is not None:  # a recipe search's trial: its objective, no failure
        value = objective(promotion)
        assert promotion is not None  # objective() refused a trial without a policy
        return Outcome(
            f"{text}\n{promotion['report']}\n\nsearch objective: "
            f"{promotion['metric']} = {value:.6g}\n",
            value,
        )
    if promotion is not None:
        text += f"\n{promotion['report']}\n"
        if promotion["decision"] == "none":
            print(text)
            raise NothingToPromote(promotion["reason"])
    return text


def main() -> None:
    run_app(_job)


if __name__ == "__main__":
    main()
