"""Register Bonsai's deployments on a running Prefect server, and serve or hand them to a work pool.

    # every deployment in prefect.yaml, run by this process on their schedules (no work pool):
    python -m flows.serve
    # the same deployments on work pool `bonsai`; `prefect worker start --pool bonsai` runs them:
    python -m flows.serve --pool bonsai
    # one deployment of your own: a name, a cron schedule, Hydra overrides after `--`
    python -m flows.serve --pool bonsai --name nightly-cnn --cron "0 2 * * *" -- teacher=cnn_large

A deployment's parameters are Hydra override strings (`{"overrides": ["teacher=cnn_large"]}`); a
run composes exactly the config `python -m flows.compress teacher=cnn_large` would
(flows/deployed.py). Everything is checked before anything is registered: the Prefect API answers,
each cron string parses, each deployment's overrides compose into a valid config. A bad one is one
line, exit 2, and nothing registered.

Registering also makes sure the server has the automation that marks a flow run Crashed when its
heartbeats stop (a worker or machine that died mid-run; Prefect's "zombie flow" recipe). Flow runs
send heartbeats every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (set in each deployment's job
variables to 30).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (environment defaults, before prefect is imported)

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
HEARTBEAT_SECONDS = 30  # flow-run heartbeats (Prefect's minimum)
ZOMBIE_AUTOMATION = "bonsai: crash flow runs whose heartbeats stopped"


@dataclass
class Deployment:
    name: str
    flow: str  # compress | promote
    overrides: list[str]
    crons: list[tuple[str, str]] = field(default_factory=list)  # (cron, timezone)
    work_pool: str | None = None
    description: str = ""
    tags: list[str] = field(default_factory=list)
    job_env: dict[str, str] = field(default_factory=dict)
    # Key patterns a triggered run may add to `overrides` (flows/deployed.py: DEFAULT_ALLOW).
    allow: list[str] | None = None

    def parameters(self) -> dict[str, Any]:
        """The deployment's parameters: its overrides, and the allow patterns that a run's
        extra overrides are checked against (read back from the server by the run)."""
        from flows.deployed import DEFAULT_ALLOW

        allow = DEFAULT_ALLOW if self.allow is None else self.allow
        return {"overrides": self.overrides, "allow": list(allow)}


def _err(message: str) -> None:
    print(f"bonsai: error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Checks (before anything is registered)


def check_cron(cron: object, timezone: str, where: str) -> None:
    """Refuse a cron string Prefect's scheduler would not accept, with the key and the value."""
    from pydantic import ValidationError

    from bonsai.errors import ConfigError

    if not isinstance(cron, str) or not cron.strip():
        raise ConfigError(f"{where}: a cron schedule is a string like '0 2 * * *' (got {cron!r})")
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        why = "; ".join(str(x["msg"]).removeprefix("Value error, ") for x in e.errors())
        raise ConfigError(
            f"{where}: invalid cron schedule {cron!r} with timezone {timezone!r} ({why}); "
            "five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *' for 02:00 "
            "every day"
        ) from None


def check_deployment(d: Deployment) -> None:
    """Cron strings parse; overrides compose into a config that validates (as the flow will)."""
    from bonsai.config import validate_config
    from bonsai.errors import ConfigError
    from bonsai.models import check_targets
    from bonsai.store import is_safe_stage_name
    from flows.compress import apply_caps
    from flows.deployed import FLOWS, check_allow_patterns, compose

    where = f"deployment {d.name!r}"
    if not is_safe_stage_name(d.name):
        raise ConfigError(
            f"{where}: a deployment name uses ASCII letters, digits, _ and - (got {d.name!r})"
        )
    if d.flow not in FLOWS:
        raise ConfigError(f"{where}: unknown flow {d.flow!r}; valid: {', '.join(FLOWS)}")
    for cron, tz in d.crons:
        check_cron(cron, tz, where)
    if d.allow is not None:
        check_allow_patterns(d.allow, f"{where}: allow")
    try:
        config = compose(d.overrides)
        cfg, _ = validate_config(apply_caps(config))
        check_targets(config, cfg.models.allowed_modules)  # what its runs will check
    except ConfigError as e:
        raise ConfigError(f"{where}: overrides {d.overrides}: {e}") from None
    if d.flow == "promote" and cfg.promote is None:
        raise ConfigError(
            f"{where}: a promote deployment needs a policy in its overrides, e.g. "
            "promote=edge_small (conf/promote/)"
        )


def prefect_api_url() -> str | None:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def check_prefect_api(timeout: float = 20.0) -> str:
    """The Prefect API URL, once it answers; ConfigError/StoreError with what to start."""
    from bonsai.errors import ConfigError
    from tasks.mlflow_backend import probe_prefect

    url = prefect_api_url()
    if not url:
        raise ConfigError(
            "deployments live on a Prefect server: start one (`prefect server start --host "
            "127.0.0.1 --port 4200`) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    probe_prefect(url, timeout)
    return url


# ---------------------------------------------------------------------------------------------
# prefect.yaml


def load_prefect_yaml(path: Path) -> list[Deployment]:
    """Bonsai's deployments from a prefect.yaml (the file `prefect deploy` reads too)."""
    import yaml

    from bonsai.errors import ConfigError
    from flows.deployed import ENTRYPOINTS

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    entries = (doc or {}).get("deployments") or []
    flow_of = {v: k for k, v in ENTRYPOINTS.items()}
    out = []
    for i, d in enumerate(entries):
        where = f"{path.name}: deployments[{i}]"
        if not isinstance(d, dict) or "name" not in d:
            raise ConfigError(f"{where}: each deployment needs a name")
        entry = d.get("entrypoint")
        if entry not in flow_of:
            raise ConfigError(
                f"{where} ({d['name']}): entrypoint {entry!r}; valid: {', '.join(flow_of)}"
            )
        params = d.get("parameters") or {}
        overrides = params.get("overrides") or []
        if not isinstance(overrides, list):
            raise ConfigError(f"{where}: parameters.overrides must be a list of key=value strings")
        unknown = set(params) - {"overrides", "allow"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown parameter(s) {sorted(unknown)}; a deployment takes "
                "`overrides` and `allow`"
            )
        crons = []
        for s in d.get("schedules") or []:
            if not isinstance(s, dict) or "cron" not in s:
                raise ConfigError(f"{where}: each schedule needs a cron string")
            crons.append((s["cron"], s.get("timezone") or "UTC"))
        pool = (d.get("work_pool") or {}).get("name")
        env = ((d.get("work_pool") or {}).get("job_variables") or {}).get("env") or {}
        out.append(
            Deployment(
                name=str(d["name"]),
                flow=flow_of[entry],
                overrides=overrides,
                crons=crons,
                work_pool=pool,
                description=str(d.get("description") or ""),
                tags=list(d.get("tags") or []),
                job_env={str(k): str(v) for k, v in env.items()},
                allow=params.get("allow"),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Registration


def _schedules(d: Deployment) -> list[Any]:
    from prefect.schedules import Cron

    return [Cron(cron, timezone=tz) for cron, tz in d.crons]


def _job_env(d: Deployment) -> dict[str, str]:
    env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}
    env.update(d.job_env)
    return env


def register(d: Deployment, pool: str) -> str:
    """Create or update deployment `d` on work pool `pool`; returns its id."""
    from prefect import Flow

    from flows.deployed import ENTRYPOINTS

    f: Any = Flow.from_source(source=str(ROOT), entrypoint=ENTRYPOINTS[d.flow])
    dep_id = f.deploy(
        name=d.name,
        work_pool_name=pool,
        build=False,
        push=False,
        schedules=_schedules(d),
        parameters=d.parameters(),
        job_variables={"env": _job_env(d)},
        description=d.description or None,
        tags=d.tags or None,
        print_next_steps=False,
    )
    return str(dep_id)


def ensure_work_pool(pool: str) -> bool:
    """Create process work pool `pool` unless it exists; True if created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True


def ensure_zombie_automation(within_s: int = 3 * HEARTBEAT_SECONDS) -> None:
    """The automation that marks a flow run Crashed when no heartbeat (nor a final state) came
    within `within_s` of its last heartbeat: a worker, container or machine that died mid-run."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        existing: Any = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        if existing.trigger.within == timedelta(seconds=within_s):
            return
        existing.delete()  # another --crash-after: replace it
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                name=None,
                force=False,
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_s} s: the process running this flow run "
                "died (worker or machine lost); run it again to resume from the cache",
            )
        ],
    ).create()


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description="Register Bonsai's deployments (prefect.yaml, or one given here) on the "
        "Prefect server at PREFECT_API_URL; serve them from this process, or hand them to a "
        "work pool with --pool.",
    )
    p.add_argument(
        "--pool",
        help="work pool to register on (created as a process pool if "
        "missing); without it this process serves the deployments itself",
    )
    p.add_argument("--file", default=str(PREFECT_YAML), help="deployments file (prefect.yaml)")
    p.add_argument("--only", action="append", default=[], help="register only this deployment")
    p.add_argument("--name", help="register one deployment of your own with this name")
    p.add_argument("--flow", default="compress", choices=["compress", "promote"])
    p.add_argument("--cron", action="append", default=[], help="cron schedule (repeatable)")
    p.add_argument("--timezone", default="UTC")
    p.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="KEY_PATTERN",
        help="a key a triggered run may override (repeatable; * wildcards; + or ~ first for "
        "additions or deletions); default: seed, epochs, learning rates, data subsets. Paths, "
        "tracking.*, hydra.*, _target_ and models.* need a pattern that names them",
    )
    p.add_argument(
        "--crash-after",
        type=int,
        default=3 * HEARTBEAT_SECONDS,
        help="seconds without a heartbeat before a flow run is marked Crashed",
    )
    p.add_argument(
        "--register-only",
        action="store_true",
        help="without --pool: register and exit instead of serving",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the --name deployment")
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from bonsai.errors import BonsaiError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.name:
            deployments = [
                Deployment(
                    name=args.name,
                    flow=args.flow,
                    overrides=list(args.overrides),
                    crons=[(c, args.timezone) for c in args.cron],
                    work_pool=args.pool,
                    allow=args.allow,
                )
            ]
        else:
            if args.overrides or args.cron or args.allow:
                raise BonsaiError(
                    "overrides, --cron and --allow describe one deployment: give it a --name "
                    "(in prefect.yaml, a deployment's parameters.allow)"
                )
            deployments = load_prefect_yaml(Path(args.file))
            if args.only:
                unknown = set(args.only) - {d.name for d in deployments}
                if unknown:
                    raise BonsaiError(
                        f"--only {', '.join(sorted(unknown))}: not in {args.file}; there: "
                        f"{', '.join(d.name for d in deployments)}"
                    )
                deployments = [d for d in deployments if d.name in args.only]
        if args.crash_after < 2 * HEARTBEAT_SECONDS:
            raise BonsaiError(
                f"--crash-after {args.crash_after}: at least {2 * HEARTBEAT_SECONDS} s (two "
                f"heartbeats of {HEARTBEAT_SECONDS} s), or live runs would be marked Crashed"
            )
        for d in deployments:  # everything checked before anything is registered
            check_deployment(d)
        url = check_prefect_api()
    except BonsaiError as e:
        _err(str(e))
        return 2

    t0 = time.perf_counter()
    ensure_zombie_automation(args.crash_after)
    if args.pool:
        if ensure_work_pool(args.pool):
            print(f"bonsai: created work pool {args.pool!r} (type process)")
        for d in deployments:
            dep_id = register(d, args.pool)
            when = ", ".join(f"{c} ({tz})" for c, tz in d.crons) or "no schedule"
            print(f"bonsai: registered {FLOW_NAMES[d.flow]}/{d.name} ({dep_id}) on work pool "
                  f"{args.pool!r}: {when}; overrides: {' '.join(d.overrides) or '(none)'}")  # fmt: skip
        print(
            f"bonsai: {len(deployments)} deployment(s) registered at {url} in "
            f"{time.perf_counter() - t0:.1f} s; start a worker to run them:\n"
            f"    prefect worker start --pool {args.pool}"
        )
        return 0
    return _serve(deployments, args.register_only)


FLOW_NAMES = {"compress": "bonsai-compress", "promote": "bonsai-promote"}


def _serve(deployments: list[Deployment], register_only: bool) -> int:
    """Serve the deployments from this process (Prefect's runner): it polls for their scheduled
    and triggered runs and runs each in a subprocess. Ctrl-C/SIGTERM pause their schedules."""
    from prefect import serve

    from flows.deployed import FLOWS

    runners: list[Any] = [
        FLOWS[d.flow].to_deployment(
            name=d.name,
            schedules=_schedules(d),
            parameters=d.parameters(),
            description=d.description or None,
            tags=d.tags or None,
        )
        for d in deployments
    ]
    if register_only:
        for r in runners:
            print(f"bonsai: registered {r.flow_name}/{r.name} ({r.apply()})")
        return 0
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
    serve(*runners)
    return 0


if __name__ == "__main__":
    sys.exit(main())
