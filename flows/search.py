"""Recipe search: Hydra's Optuna sweeper (`hydra-optuna-sweeper`) runs the compress flow as its
trials, and each trial's objective is what promotion would pick from that trial's variants.

    python -m flows.compress -m experiment=cifar10_frontier search=cifar10_recipes
    python -m flows.compress -m search=digits_recipes hydra.sweeper.n_trials=8

A `search=` preset chooses the sweeper, the pipeline the trials run, the search space
(`hydra.sweeper.params`) and a promotion policy (`promote=`) in dry-run mode: the policy's
constraints encode the user's requirement ("smallest within 1 point of the teacher", "most
accurate under 110 KB") and its objective is the number the sweeper optimizes. A trial returns
the policy winner's objective value, or the worst value (+inf when minimizing, -inf when
maximizing) when none of its variants meets the constraints. Like promotion, it never looks
at the test split: an `accuracy` objective or bound is the validation split's (`val_accuracy`,
bonsai.promotion), so the search cannot fit its recipe to the images the reported accuracy is
measured on. Every trial is an ordinary pipeline
run in MLflow; stages that trials share (the teacher) come from the cache. After the search,
`python -m flows.promote promote=<policy> promote.scope=experiment` registers the winner.

Everything a search needs is checked before the first trial: the sweeper's direction must be the
policy's, every searched key must exist in the config.
"""

from __future__ import annotations

import math
from typing import Any

OPTUNA = "hydra_plugins.hydra_optuna_sweeper"


def optuna_direction(sweeper: Any) -> str | None:
    """'minimize' or 'maximize' when `sweeper` (hydra.sweeper) is the Optuna sweeper, else None."""
    if sweeper is None or OPTUNA not in str(sweeper.get("_target_", "")):
        return None
    direction = sweeper.get("direction", "minimize")
    if isinstance(direction, (list, tuple)) or (
        hasattr(direction, "__len__") and not isinstance(direction, str)
    ):
        return "multi"
    return str(getattr(direction, "name", direction)).lower()


def current_direction() -> str | None:
    """The Optuna sweeper's direction when this process runs a search trial, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return optuna_direction(HydraConfig.get().sweeper)


def check_search(args: list[str]) -> None:
    """Refuse a search that cannot work, before Hydra starts its first trial (ConfigError)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from bonsai.config import validate_config
    from bonsai.errors import ConfigError
    from flows.compose import compose_hydra, explain_hydra_error, parse_overrides

    # Keys searched from the command line (key=interval(...), key=choice(...)): composed at one
    # value each, checked as keys below.
    searched: list[str] = []
    fixed: list[str] = []
    for o in parse_overrides(args, "cannot parse the command line"):
        if o.is_sweep_override():
            key = o.get_key_element()
            first = (
                o.value().start  # type: ignore[union-attr]
                if o.is_interval_sweep()
                else next(o.sweep_string_iterator())
            )
            fixed.append(f"{key}={first}")
            searched.append(key.lstrip("+~"))
        else:
            fixed.append(o.input_line or "")
    try:
        cfg = compose_hydra(fixed, with_hydra=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(explain_hydra_error(e)) from None
    sweeper: Any = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)
    direction = optuna_direction(sweeper)
    if direction is None:
        return
    if direction == "multi":
        raise ConfigError(
            "hydra.sweeper.direction: a recipe search optimizes one objective, the promotion "
            "policy's; set hydra.sweeper.direction=minimize or maximize"
        )
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={direction!r}: use minimize or maximize")
    params = sweeper.get("params") or {}
    if not params and not searched:
        raise ConfigError(
            "hydra.sweeper.params is empty: nothing to search; e.g. "
            "hydra.sweeper.params.pipeline.stages.student.temperature='interval(1,8)'"
        )
    unresolved: Any = OmegaConf.to_container(cfg, resolve=False)
    for key in params:
        node: Any = unresolved
        for part in str(key).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(
                    f"hydra.sweeper.params.{key}: {key} is not a key of the config; check its "
                    "spelling (pipeline.stages.<stage>.<knob>, student.<knob>, ...)"
                )
            node = node[part]
    plain: Any = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]), resolve=True
    )
    run_cfg, _ = validate_config(plain)  # the trials' config, as each trial will check it
    if run_cfg.promote is None:
        raise ConfigError(
            "a recipe search ranks each trial by a promotion policy, and none is set: add "
            "promote=edge_small (or another conf/promote preset), or use a search=... preset"
        )
    policy = run_cfg.promote
    want = "minimize" if policy.objective.lower_is_better else "maximize"
    if direction != want:
        raise ConfigError(
            f"hydra.sweeper.direction={direction} but policy {policy.name!r} ranks by "
            f"{'lowest' if want == 'minimize' else 'highest'} {policy.objective.metric}; set "
            f"hydra.sweeper.direction={want}"
        )


def objective(promotion: dict[str, Any] | None) -> float:
    """The trial's objective: the policy winner's value, or the worst value when none passed."""
    if promotion is None:  # check_search makes this impossible under the sweeper
        raise ValueError("a recipe search needs a promotion policy (promote=...)")
    if promotion.get("winner") is None:
        return math.inf if promotion["lower_is_better"] else -math.inf
    return float(promotion["value"])
