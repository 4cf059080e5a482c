"""Compose config -> validate -> build the stage DAG -> run it -> compare -> report.

python -m flows.compress                                   # the default pipeline on digits
python -m flows.compress teacher=mobilenet_v3_small pipeline.stages.student.temperature=2
python -m flows.compress -m pipeline.stages.student.alpha=0.5,0.9   # a sweep
"""

from __future__ import annotations

import contextlib
import json
import logging
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
    """Apply run-wide caps, then validate config, graph, store, models and data: everything that
    can fail before any compute, Prefect task or MLflow run starts, cheapest first."""
    from bonsai.config import validate_config
    from bonsai.data import expected_input, load_data
    from tasks.store import check_store

    raw = apply_caps(raw)
    cfg, plan = validate_config(raw)
    check_store(cfg.tracking.uri, cfg.tracking.store_dir)
    expected = expected_input(cfg.data)
    if expected is not None:  # before a decode that can take minutes
        _check_models(plan, *expected)
    data = load_data(cfg.data)
    if expected != (data.input_shape, data.num_classes):
        _check_models(plan, data.input_shape, data.num_classes)
    return raw, cfg, plan, data


def _check_models(plan, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Build every model a stage declares and run a zero batch through it."""
    from bonsai.models import check_fits_data

    for s in plan.stages:
        spec = getattr(s.config, "model", None)
        # torchvision families adapt their stem and head to any channels and classes, and pool
        # adaptively; the check matters for the cnn family and user modules (`_target_`).
        if spec is not None and (spec.get("_target_") or spec.get("name") == "cnn"):
            check_fits_data(spec, input_shape, num_classes, f"pipeline.stages.{s.name}.model")


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

    from bonsai.artifacts import remove_stale_temp
    from tasks import tracking
    from tasks.compare import compare_variants
    from tasks.store import init_store

    log = get_run_logger()
    raw, cfg, plan, data = prepared
    uri, exp_id = init_store(cfg.tracking.uri, cfg.tracking.store_dir, cfg.tracking.experiment)
    store_dir = str(Path(cfg.tracking.store_dir).resolve())
    reaped = tracking.reap_orphans(exp_id)
    if reaped:
        log.warning(f"marked {len(reaped)} run(s) left RUNNING by a dead process as KILLED")
    for folder in ("stages", "eval", "records"):
        remove_stale_temp(Path(store_dir) / folder)
        for sub in (Path(store_dir) / folder).glob("*/"):
            remove_stale_temp(sub)
    parent, parent_name = tracking.start_parent(exp_id, cfg.pipeline.name, raw, overrides, data)
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
    }
    t0 = time.perf_counter()
    try:
        futures = _run_stages(plan, cfg.seed, run)
        failed = [
            n for n in plan.names() if n not in futures or not futures[n].state.is_completed()
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
    from prefect.runtime import flow_run

    return {
        "parent_run_id": parent,
        "parent_name": parent_name,
        "flow_run_id": str(flow_run.id),
        "experiment_id": exp_id,
        "tracking_uri": uri,
        "table": cmp["table"],
        "rows": cmp["rows"],
        "stages": {
            n: {k: r[k] for k in ("run_id", "key", "seconds", "metrics", "artifact", "cached")}
            for n, r in results.items()
        },
        "seconds": time.perf_counter() - t0,
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

    def failed(name: str) -> bool:
        return name in skipped or (
            name in futures
            and futures[name].state.is_final()
            and not futures[name].state.is_completed()
        )

    while waiting or any(not f.state.is_final() for f in futures.values()):
        for s in list(waiting):
            deps = [d for d in (s.input, s.teacher) if d]
            if any(failed(d) for d in deps):
                waiting.remove(s)  # an upstream stage failed: this one never runs
                skipped.add(s.name)
            elif all(d in futures and futures[d].state.is_completed() for d in deps):
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
    prepared = prepare(config)
    _, cfg, plan, _ = prepared
    import torch
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    workers, threads = _threads(cfg, plan)
    torch.set_num_threads(threads)  # process-wide: set once, before any stage runs
    _quiet_user_errors()

    # Prefect's overloads for flow(fn, **options) reject a typed task runner: hence the ignore.
    def compress_flow(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
        # `config` is the flow's parameter as Prefect records it; the body runs on its validated
        # form. Signal handlers again: Prefect's engine installs its own for the flow run.
        with _stop_on_signals():
            return _run_pipeline(prepared, overrides)

    f = flow(  # type: ignore[call-overload]
        compress_flow,
        name="compress",
        task_runner=ThreadPoolTaskRunner(max_workers=workers),
        validate_parameters=False,
    )
    return f(prepared[0], list(overrides or []))


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every failed task and flow run with its traceback. A BonsaiError (a gate that
    failed, a full disk, a diverging loss) is a message for the user, not a bug: log it as one
    line. Anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from bonsai.errors import BonsaiError

        if record.exc_info and isinstance(record.exc_info[1], BonsaiError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForUserErrors())


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _on_stop_signal(signum, _frame) -> None:
    """Ctrl-C (SIGINT) or SIGTERM: end this process's open MLflow runs as KILLED, stop the
    temporary Prefect server, exit 128 + signal (130, 143) within seconds.

    Python's default would raise KeyboardInterrupt in the main thread only, while the stage
    trains on in a worker thread; waiting for it could take minutes. The stage's artifact is
    still a `.tmp-` folder and its record is written only after it finished, so nothing partial
    is cached: the same command resumes from the last finished stage. SIGKILL cannot be caught:
    the next start marks such runs KILLED (tracking.reap_orphans).
    """
    name = signal.Signals(signum).name
    if "tasks.tracking" in sys.modules:  # runs can only be open once tracking is imported
        sys.modules["tasks.tracking"].kill_open_runs(f"interrupted by {name}")
    try:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    print(
        f"\nbonsai: interrupted by {name}: open runs ended KILLED, nothing partial was cached; "
        "run the same command again to resume from the last finished stage",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)


@contextlib.contextmanager
def _stop_on_signals():
    """Install `_on_stop_signal` for SIGINT and SIGTERM while the block runs (main thread only).

    Installed for the whole command and again inside the flow: Prefect's engine swaps in its own
    handlers for a flow run, which would wait for the running stage to return before exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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


# Command-line flags of Hydra's own (help, config printing, ...): the command is then Hydra's.
_HYDRA_FLAGS = ("-m", "--multirun")


def check_overrides(args: list[str]) -> None:
    """Compose the config the command line asks for before Hydra runs it, so a bad override is
    one Bonsai message and exit 2 instead of Hydra's trace-style text and exit 1. A sweep is
    checked value by value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bonsai.errors import ConfigError

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as e:
        raise ConfigError(f"cannot parse the command line: {e}") from None
    first: list[str] = []
    sweeps: list[tuple[int, str, list[str]]] = []
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            first.append(f"{o.get_key_element()}={values[0]}")
            sweeps.append((i, o.get_key_element(), values[1:]))
        else:
            first.append(o.input_line or "")
    # The first value of every swept key together, then each other value on its own.
    variants = [first] + [
        [*first[:i], f"{key}={v}", *first[i + 1 :]] for i, key, values in sweeps for v in values
    ]
    for overrides in variants[:200]:
        try:
            compose_config(overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(_explain_hydra_error(e)) from None


def _explain_hydra_error(e: Exception) -> str:
    """Hydra's and OmegaConf's messages, as one Bonsai message with the fix."""
    text = str(e).split("\nConfig search path:")[0].strip()
    key = getattr(e, "full_key", None)
    if "Could not override" in text and "'" in text:
        target = text.split("'")[1]
        hint = f"check its spelling, or add a new key with +{target}=..."
        group = target.split(".")[0]
        if group in ("teacher", "student") and target.endswith("_target_"):
            hint = f"for your own model use {group}=custom {group}._target_=my_pkg.MyNet"
        return f"invalid override: {target} is not a key of the config; {hint}"
    if "Could not find" in text and "Available options" in text:
        head, _, options = text.partition("Available options")
        names = [line.strip() for line in options.splitlines()[1:] if line.strip()]
        what = head.split("Could not find")[-1].strip().strip("'")
        return f"unknown config option {what!r}; available: {', '.join(names)}"
    if "Missing mandatory value" in text and key:
        return f"{key} must be set, e.g. {key}=... on the command line"
    return f"invalid configuration: {' '.join(text.split())}"


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from bonsai.errors import BonsaiError, ConfigError, DataError
    from bonsai.store import StoreError

    # The library's notes to the user (e.g. files the data loader skipped), one line each.
    notes = logging.getLogger("bonsai")
    if not notes.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bonsai: %(message)s"))
        notes.addHandler(handler)
        notes.setLevel(logging.INFO)
        notes.propagate = False

    args = sys.argv[1:]
    multirun = bool({"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(args))
    report_file = None
    if multirun:
        import tempfile

        # Each job (in this process or a launcher's worker) appends its outcome here.
        fd, report_file = tempfile.mkstemp(prefix="bonsai-sweep-", suffix=".jsonl")
        os.close(fd)
        os.environ["BONSAI_SWEEP_REPORT"] = report_file
    if not any(a.startswith("-") and a not in _HYDRA_FLAGS for a in args):
        try:
            check_overrides([a for a in args if a not in _HYDRA_FLAGS])
        except ConfigError as e:
            print(f"bonsai: error: {e}", file=sys.stderr)
            _fast_exit(2)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig

        raw: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[assignment]
        overrides = list(HydraConfig.get().overrides.task)
        _split_cpus_between_parallel_jobs(raw, HydraConfig.get())
        code, message = 0, ""
        try:
            result = compress(raw, overrides)
            print(report(result))
        except (ConfigError, DataError, StoreError) as e:  # nothing ran: fix it, run again
            code, message = 2, str(e)
        except BonsaiError as e:  # a stage failed; its run holds the details
            code, message = 1, str(e)
        except Exception as e:
            if not os.environ.get("BONSAI_SWEEP_REPORT"):
                raise
            import traceback

            traceback.print_exc()  # a bug in one job: the sweep still runs the others
            code, message = 1, f"{type(e).__name__}: {e}"
        if code:
            print(f"bonsai: error: {message}", file=sys.stderr)
        if path := os.environ.get("BONSAI_SWEEP_REPORT"):
            with open(path, "a") as f:  # one short line per job: appends do not interleave
                f.write(json.dumps({"overrides": overrides, "code": code, "error": message}) + "\n")
        elif code:
            sys.exit(code)
        return None

    code = 0
    try:
        with _stop_on_signals():
            _main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if report_file is not None:
        code = max(code, _sweep_summary(Path(report_file)))
        Path(report_file).unlink(missing_ok=True)
        # A parallel launcher's worker processes are stopped by the interpreter's own shutdown
        # sequence (threads first, then exit handlers); leave it the normal way.
        sys.exit(code)
    _fast_exit(code)


def _sweep_summary(path: Path) -> int:
    """Print which sweep jobs failed; the exit code is the worst job's (0 when all finished)."""
    jobs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not jobs:  # Hydra refused the command line before any job
        return 0
    failed = [j for j in jobs if j["code"]]
    if not failed:
        print(f"bonsai: sweep finished: all {len(jobs)} job(s) succeeded")
        return 0
    print(f"bonsai: error: {len(failed)} of {len(jobs)} sweep job(s) failed:", file=sys.stderr)
    for j in failed:
        print(f"  {' '.join(j['overrides'])}: {j['error']}", file=sys.stderr)
    return max(j["code"] for j in failed)


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
