"""Compose config -> validate -> build the stage DAG -> run it -> compare -> report.

python -m flows.compress                                   # the default pipeline on digits
python -m flows.compress teacher=mobilenet_v3_small pipeline.stages.student.temperature=2
python -m flows.compress -m pipeline.stages.student.alpha=0.5,0.9   # a sweep
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (environment defaults, before prefect is imported)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config the shell would compose for these Hydra overrides (for tests,
    deployments and schedules, which pass override strings rather than a config)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def prepare(raw: dict[str, Any]):
    """Apply run-wide caps, then validate config, graph and data: everything that can fail
    before any compute, Prefect task or MLflow run starts."""
    from bonsai.config import validate_config
    from bonsai.data import load_data
    from bonsai.models import check_fits_data
    from bonsai.preflight import check_stage_models

    raw = apply_caps(raw)
    cfg, plan = validate_config(raw)
    data = load_data(cfg.data)
    for s in plan.stages:
        spec = getattr(s.config, "model", None)
        # torchvision families adapt their stem and head to any channels and classes, and pool
        # adaptively; the check matters for the cnn family and user modules (`_target_`).
        if spec is not None and (spec.get("_target_") or spec.get("name") == "cnn"):
            check_fits_data(
                spec, data.input_shape, data.num_classes, f"pipeline.stages.{s.name}.model"
            )
    # Stage checks that need the models built (layer names, channel counts).
    check_stage_models(plan, data.input_shape, data.num_classes)
    return raw, cfg, plan, data


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


def _threads(cfg, plan) -> tuple[int, int]:
    """(concurrent stages, torch threads per stage): their product never exceeds the CPUs."""
    cpus = cfg.runtime.cpus or len(os.sched_getaffinity(0))
    workers = max(1, min(cfg.runtime.max_workers, plan.width(), cpus))
    return workers, max(1, cpus // workers)


def _run_pipeline(prepared: tuple, overrides: list[str]) -> dict[str, Any]:
    """The flow's body, on the config `prepare` already validated."""
    from prefect import get_run_logger
    from prefect.futures import wait

    from bonsai.artifacts import remove_stale_temp
    from tasks import tracking
    from tasks.compare import compare_variants
    from tasks.stages import run_stage

    log = get_run_logger()
    raw, cfg, plan, data = prepared
    uri, exp_id = tracking.init_store(
        cfg.tracking.uri, cfg.tracking.store_dir, cfg.tracking.experiment
    )
    store_dir = str(Path(cfg.tracking.store_dir).resolve())
    reaped = tracking.reap_orphans(exp_id)
    if reaped:
        log.warning(f"marked {len(reaped)} run(s) left RUNNING by a dead process as KILLED")
    remove_stale_temp(Path(store_dir) / "stages")
    parent = tracking.start_parent(exp_id, f"{cfg.pipeline.name}", raw, overrides, data.describe())
    log.info(f"pipeline {cfg.pipeline.name}: {' -> '.join(plan.names())} (MLflow run {parent})")
    data_cfg = cfg.data.model_dump()
    eval_cfg = cfg.eval.model_dump()
    futures: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        for s in plan.stages:
            futures[s.name] = run_stage.submit(
                s.name,
                s.kind,
                s.params,
                s.seed(cfg.seed),
                data_cfg,
                store_dir,
                exp_id,
                parent,
                eval_cfg,
                cfg.runtime.progress,
                force=plan.forced(s.name),
                input=futures[s.input] if s.input else None,
                teacher=futures[s.teacher] if s.teacher else None,
            )
        wait(list(futures.values()))
        failed = [n for n, f in futures.items() if not f.state.is_completed()]
        if failed:
            _raise_first_failure(plan, futures, failed)
        results = {n: f.result() for n, f in futures.items()}
        cmp = compare_variants(list(results.values()), plan.reference, data_cfg, eval_cfg, parent)
        tracking.end_run(parent, "FINISHED")
    except BaseException as e:
        tracking.end_run(parent, "FAILED", f"{type(e).__name__}: {e}")
        raise
    return {
        "parent_run_id": parent,
        "experiment_id": exp_id,
        "tracking_uri": uri,
        "table": cmp["table"],
        "rows": cmp["rows"],
        "stages": {
            n: {k: r[k] for k in ("run_id", "seconds", "metrics", "artifact", "cached")}
            for n, r in results.items()
        },
        "seconds": time.perf_counter() - t0,
    }


def _raise_first_failure(plan, futures, failed: list[str]) -> None:
    from bonsai.errors import StageFailed

    for name in plan.names():  # dependency order: the root cause first
        if name not in failed:
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
    prepared = prepare(config)
    _, cfg, plan, _ = prepared
    import torch
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    workers, threads = _threads(cfg, plan)
    torch.set_num_threads(threads)  # process-wide: set once, before any stage runs

    # Prefect's overloads for flow(fn, **options) reject a typed task runner: hence the ignore.
    def compress_flow(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
        # `config` is the flow's parameter as Prefect records it; the body runs on its validated
        # form. The SIGTERM handler is installed inside the flow: Prefect's engine swaps in its
        # own for the flow run, which would wait for the running stage to return before exiting.
        with _terminate_cleanly():
            return _run_pipeline(prepared, overrides)

    f = flow(  # type: ignore[call-overload]
        compress_flow,
        name="compress",
        task_runner=ThreadPoolTaskRunner(max_workers=workers),
        validate_parameters=False,
    )
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.stages import prefect_dirs

    # Cached stage results live in the store beside the artifacts they point to.
    _, results = prefect_dirs(str(Path(cfg.tracking.store_dir).resolve()))
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(results)}):
        return f(prepared[0], list(overrides or []))


@contextlib.contextmanager
def _terminate_cleanly():
    """On SIGTERM: end this process's open MLflow runs as KILLED, stop the temporary Prefect
    server, exit 143. (Python's default would leave the runs RUNNING and the server orphaned;
    waiting for the running stage to return could take minutes.) SIGKILL cannot be caught: the
    next start marks such runs KILLED (tracking.reap_orphans)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, _frame):
        from tasks import tracking

        tracking.kill_open_runs(f"terminated by signal {signal.Signals(signum).name}")
        try:
            from prefect.server.api.server import SubprocessASGIServer

            for server in list(SubprocessASGIServer._instances.values()):
                server.stop()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        os._exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report(result: dict[str, Any]) -> str:
    uri = result["tracking_uri"]
    return (
        f"\n{result['table']}\n\n"
        f"Δacc, agreement, speedup and size are against the reference stage; latency is "
        f"onnxruntime at batch 1, measured side by side.\n"
        f"Pipeline run {result['parent_run_id']} finished in {result['seconds']:.1f} s.\n"
        f"Compare the runs in the MLflow UI:\n    mlflow ui --backend-store-uri {uri}\n"
    )


def _split_cpus_between_parallel_jobs(raw: dict[str, Any], hydra_cfg) -> None:
    """Under a parallel launcher (joblib), give each job its share of the CPUs, so that
    jobs x torch threads never exceeds the cores. An explicit runtime.cpus wins."""
    from hydra.types import RunMode

    launcher = hydra_cfg.launcher
    if hydra_cfg.mode != RunMode.MULTIRUN or "joblib" not in str(launcher.get("_target_", "")):
        return
    if raw.get("runtime", {}).get("cpus") is not None:
        return
    cpus = len(os.sched_getaffinity(0))
    n_jobs = int(launcher.get("n_jobs") or -1)
    n_jobs = cpus if n_jobs <= 0 else n_jobs
    raw.setdefault("runtime", {})["cpus"] = max(1, cpus // n_jobs)


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from bonsai.errors import BonsaiError, ConfigError, DataError

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        raw: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[assignment]
        overrides = list(HydraConfig.get().overrides.task)
        _split_cpus_between_parallel_jobs(raw, HydraConfig.get())
        try:
            result = compress(raw, overrides)
        except (ConfigError, DataError) as e:  # nothing ran: fix the input and run again
            print(f"bonsai: error: {e}", file=sys.stderr)
            sys.exit(2)
        except BonsaiError as e:  # a stage failed; its run holds the details
            print(f"bonsai: error: {e}", file=sys.stderr)
            sys.exit(1)
        print(report(result))
        return None

    code = 0
    try:
        _main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if {"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(sys.argv[1:]):
        # A parallel launcher's worker processes are stopped by the interpreter's own shutdown
        # sequence (threads first, then exit handlers); leave it the normal way.
        sys.exit(code)
    _fast_exit(code)


def _fast_exit(code: int) -> None:
    """Run the exit handlers (Prefect stops its temporary server, MLflow flushes), flush the
    streams, then skip the interpreter's module teardown: with torch's compiler stack imported
    it takes 1-2 s, paid by every command for nothing."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
