"""The flows that deployments run: each takes Hydra override strings, composes exactly the config
the shell command with the same overrides would (`flows.cli.compose_config`), and runs it.

    python -m flows.compress teacher=cnn_large seed=1
    # is what a run of a deployment with parameters {"overrides": ["teacher=cnn_large", "seed=1"]}
    # does: same resolved config, same `bonsai.config_hash` on the MLflow parent run.

Deployments are registered by `python -m flows.serve` (from `prefect.yaml`) or `prefect deploy`;
their entrypoints are `flows/deployed.py:compress_overrides` and
`flows/deployed.py:promote_overrides`. The pipeline itself runs as the `compress` flow (a subflow
of this one), so a deployed run and a shell run look the same in Prefect and in MLflow.
"""

from __future__ import annotations

from typing import Any

# isort: off
import flows  # noqa: F401  (environment defaults, before prefect is imported)
from prefect import flow

# isort: on


def compose(overrides: list[str]) -> dict[str, Any]:
    """The config for these overrides, or ConfigError with Bonsai's one-line message."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bonsai.errors import ConfigError
    from flows.cli import _explain_hydra_error, compose_config

    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise ConfigError(f"overrides must be strings like key=value (got {bad[0]!r})")
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise ConfigError(
            f"deployment overrides are Hydra overrides (key=value), not flags (got {flags[0]!r}); "
            "a deployment runs one pipeline: register one deployment per sweep variant"
        )
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(f"invalid override: {' '.join(str(e).split())}") from None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps:
        raise ConfigError(
            f"deployment override {sweeps[0]!r} is a sweep; a deployment runs one pipeline: "
            "register one deployment per value"
        )
    try:
        return compose_config(list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain_hydra_error(e)) from None


@flow(name="bonsai-compress", validate_parameters=True, persist_result=False)
def compress_overrides(overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline that `python -m flows.compress OVERRIDES...` would run."""
    from flows.compress import compress
    from tasks.tracking import config_hash

    overrides = list(overrides or [])
    config = compose(overrides)
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
def promote_overrides(overrides: list[str] | None = None) -> dict[str, Any]:
    """Run what `python -m flows.promote OVERRIDES...` would run (e.g. promote=server_fast)."""
    from flows.promote import promote_runs

    config = compose(list(overrides or []))
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
