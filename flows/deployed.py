"""The flows that deployments run: each takes Hydra override strings, composes exactly the config
the shell command with the same overrides would (`flows.compose.compose_config`), and runs it.

    python -m flows.compress teacher=cnn_large seed=1
    # is what a run of a deployment with parameters {"overrides": ["teacher=cnn_large", "seed=1"]}
    # does: same resolved config, same `bonsai.config_hash` on the MLflow parent run.

Deployments are registered by `python -m flows.serve` (from `prefect.yaml`) or `prefect deploy`;
their entrypoints are `flows/deployed.py:compress_overrides` and
`flows/deployed.py:promote_overrides`. The pipeline itself runs as the `compress` flow (a subflow
of this one), so a deployed run and a shell run look the same in Prefect and in MLflow.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

# isort: off
import flows  # noqa: F401  (environment defaults, before prefect is imported)
from prefect import flow

# isort: on


def compose(overrides: list[str]) -> dict[str, Any]:
    """The config for these overrides, or ConfigError with Bonsai's one-line message."""
    from bonsai.errors import ConfigError
    from flows.compose import compose_checked, parse_overrides

    _check_strings(overrides)
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise ConfigError(
            f"deployment overrides are Hydra overrides (key=value), not flags (got {flags[0]!r}); "
            "a deployment runs one pipeline: register one deployment per sweep variant"
        )
    sweeps = [o.input_line for o in parse_overrides(overrides) if o.is_sweep_override()]
    if sweeps:
        raise ConfigError(
            f"deployment override {sweeps[0]!r} is a sweep; a deployment runs one pipeline: "
            "register one deployment per value"
        )
    return compose_checked(overrides)


# ---------------------------------------------------------------------------------------------
# What a triggered run may change.
#
# A deployment's parameters come from whoever may trigger it through the Prefect API, who is not
# thereby allowed to run code on the worker. The owner registers the deployment with its
# overrides and the key patterns a run may add (`python -m flows.serve --allow PATTERN`, stored as
# the deployment's `allow` parameter). A run applies the owner's overrides as registered, read
# from the deployment on the server, and adds only overrides whose key an allow pattern matches.

# Without --allow: the knobs one retrains with (seed, epochs, learning rates, data subsets).
DEFAULT_ALLOW = (
    "seed",
    "pipeline.stages.*.epochs",
    "pipeline.stages.*.lr",
    "data.max_train",
    "data.max_test",
    "data.max_val",
)
_PATHLIKE = re.compile(r"(^|_)(root|path|dir|uri|address|python|file)$")
_PATTERN = re.compile(r"^(\+\+|\+|~)?[A-Za-z0-9_*?\[\]./-]+$")


def sensitive(key: str) -> str | None:
    """Why overriding `key` can do more than retrain (None: it cannot). A wildcard never grants a
    sensitive key: only a pattern that names the sensitive part itself does (`tracking.*`,
    `teacher._target_`, `*.root`)."""
    parts = re.split(r"[./]", key)
    if parts[0] == "hydra":
        return "Hydra's settings (output folders, launchers, callbacks) run code and write files"
    if any(p.startswith("_") for p in parts):
        return "it names code to import and call"
    if parts[0] in ("tracking", "models"):
        return {
            "tracking": "it decides where runs and artifacts are written",
            "models": "it decides which modules a `_target_` may import",
        }[parts[0]]
    if key == "data":
        return "it chooses the data set, and with it the files read"
    if _PATHLIKE.search(parts[-1]):
        return "it is a path, address or program"
    if parts[-1] == "trust":
        return "it lets a model file run code when it is loaded"
    return None


def check_allow_patterns(patterns: Any, where: str = "allow") -> list[str]:
    """The owner's allow patterns, each a key pattern like `pipeline.stages.*.epochs`."""
    from bonsai.errors import ConfigError

    if not isinstance(patterns, list):
        raise ConfigError(f"{where}: a list of key patterns like 'seed' (got {patterns!r})")
    for p in patterns:
        if not isinstance(p, str) or not _PATTERN.match(p):
            raise ConfigError(
                f"{where}: {p!r} is not a key pattern; use config keys with * wildcards, e.g. "
                "'seed', 'pipeline.stages.*.epochs', '+teacher.*' (a + or ~ allows additions "
                "or deletions of those keys)"
            )
    return list(patterns)


def _split_prefix(text: str) -> tuple[str, str]:
    for prefix in ("++", "+", "~"):
        if text.startswith(prefix):
            return prefix, text[len(prefix) :]
    return "", text


def _allowed(prefix: str, key: str, patterns: list[str]) -> bool:
    needs_explicit = sensitive(key) is not None
    for pattern in patterns:
        p_prefix, p_key = _split_prefix(pattern)
        if p_prefix != prefix or not fnmatch.fnmatchcase(key, p_key):
            continue
        if needs_explicit and sensitive(p_key) is None:
            continue  # `*` or `pipeline.*` does not grant `pipeline.stages.x.model._target_`
        return True
    return False


def effective_overrides(owner: list[str], requested: list[str], allow: list[str]) -> list[str]:
    """The overrides a deployment run composes: the owner's, with the requested ones that differ
    from them added; ConfigError naming the first that the allow patterns do not cover."""
    from hydra.core.override_parser.types import OverrideType

    from bonsai.errors import ConfigError
    from flows.compose import parse_overrides

    _check_strings(requested)
    extra = [o for o in requested if o not in owner]
    parsed = parse_overrides(extra)
    prefix_of = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}
    changed: set[str] = set()
    for o in parsed:
        key = o.key_or_group
        prefix = prefix_of.get(o.type, "")
        text = o.input_line or key
        if o.package is not None:
            raise ConfigError(
                f"deployment override {text!r}: a @package override is not accepted from a run"
            )
        value = text.split("=", 1)[1] if "=" in text else ""
        if "${" in value:
            raise ConfigError(
                f"deployment override {text!r}: interpolations (${{...}}) read other keys and the "
                "worker's environment; give a plain value"
            )
        if not _allowed(prefix, key, allow):
            why = sensitive(key)
            if prefix:
                hint = (
                    f"adding or deleting a key needs a pattern that starts with {prefix}, e.g. "
                    f"--allow '{prefix}{key}'"
                )
            elif why:
                hint = f"{why}: only a pattern that names it grants it, e.g. --allow '{key}'"
            else:
                hint = "the deployment's owner allows keys with `python -m flows.serve --allow`"
            raise ConfigError(
                f"deployment override {text!r} is not allowed: key {prefix}{key} matches none of "
                f"the deployment's allow patterns {allow} ({hint}; README: Security)"
            )
        changed.add(key)
    kept = [
        o
        for o, p in zip(owner, parse_overrides(owner), strict=True)
        if p.key_or_group not in changed
    ]
    return kept + extra


def _check_strings(overrides: Any) -> None:
    from bonsai.errors import ConfigError

    if not isinstance(overrides, list):
        raise ConfigError(f"overrides must be a list of key=value strings (got {overrides!r})")
    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise ConfigError(f"overrides must be strings like key=value (got {bad[0]!r})")


def deployment_overrides(requested: list[str] | None, allow: list[str] | None) -> list[str] | None:
    """Inside a flow run started from a deployment: the overrides to compose, checked against the
    deployment's record on the server (never against the run's own parameters). None when this
    flow run was not started from a deployment (a direct call: its caller already runs code)."""
    from prefect.runtime import deployment

    from bonsai.errors import ConfigError

    dep_id = deployment.id
    if not dep_id:
        return None
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        record = client.read_deployment(UUID(str(dep_id)))
    params = record.parameters or {}
    owner = params.get("overrides") or []
    _check_strings(owner)
    registered = check_allow_patterns(
        params.get("allow", list(DEFAULT_ALLOW)), f"deployment {record.name!r}: allow"
    )
    if allow is not None and list(allow) != registered:
        raise ConfigError(
            f"the run's allow parameter {allow} differs from deployment {record.name!r}'s "
            f"{registered}: only its owner changes it, by registering it again "
            "(python -m flows.serve --allow ...)"
        )
    return effective_overrides(owner, list(requested or []), registered)


def _compose_run(overrides: list[str] | None, allow: list[str] | None) -> tuple[list[str], dict]:
    """The checked overrides and their config for a deployment's flow run (or a direct call)."""
    from bonsai.models import check_targets

    requested = list(overrides or [])
    effective = deployment_overrides(requested, allow)
    if effective is None:  # not started from a deployment
        return requested, compose(requested)
    config = compose(effective)
    check_targets(config, config["models"]["allowed_modules"])
    return effective, config


@flow(name="bonsai-compress", validate_parameters=True, persist_result=False)
def compress_overrides(
    overrides: list[str] | None = None, allow: list[str] | None = None
) -> dict[str, Any]:
    """Run the pipeline that `python -m flows.compress OVERRIDES...` would run. From a
    deployment, only the overrides its owner allowed (`allow`, set when registering)."""
    from flows.compress import compress
    from tasks.tracking import config_hash

    overrides, config = _compose_run(overrides, allow)
    result = compress(config, overrides)
    promotion = result.get("promotion")
    if promotion is not None and promotion["decision"] == "none":
        from bonsai.errors import NothingToPromote

        raise NothingToPromote(promotion["reason"])  # as the command line: the run failed
    return {
        "parent_run_id": result["parent_run_id"],
        "parent_name": result["parent_name"],
        "experiment_id": result["experiment_id"],
        "tracking_uri": result["tracking_uri"],
        "config_hash": config_hash(config),
        "stages": {n: s["run_id"] for n, s in result["stages"].items()},
        "promotion": (result.get("promotion") or {}).get("decision"),
    }


@flow(name="bonsai-promote", validate_parameters=True, persist_result=False)
def promote_overrides(
    overrides: list[str] | None = None, allow: list[str] | None = None
) -> dict[str, Any]:
    """Run what `python -m flows.promote OVERRIDES...` would run (e.g. promote=server_fast)."""
    from flows.promote import promote_runs

    _, config = _compose_run(overrides, allow)
    result = promote_runs(config)
    if result["decision"] == "none":
        from bonsai.errors import NothingToPromote

        raise NothingToPromote(result["reason"])
    return {k: result.get(k) for k in ("decision", "reason", "report")}


FLOWS = {"compress": compress_overrides, "promote": promote_overrides}
ENTRYPOINTS = {
    "compress": "flows/deployed.py:compress_overrides",
    "promote": "flows/deployed.py:promote_overrides",
}
