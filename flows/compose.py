"""Hydra composition, shared by every way a config is made: the command line (flows/cli.py), the
recipe search's checks (flows/search.py), deployments (flows/deployed.py), tests and benches.

`compose_config(overrides)` is the resolved plain dict the shell would compose for these
overrides; `explain_hydra_error` turns Hydra's and OmegaConf's messages into one Bonsai message
with the fix; `parse_overrides` is Hydra's override parser with that message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_hydra(overrides: list[str] | None = None, *, with_hydra: bool = False) -> Any:
    """The composed DictConfig (with Hydra's own node when `with_hydra`), unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="config", overrides=list(overrides or []), return_hydra_config=with_hydra
        )


def compose_config(overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config the shell would compose for these Hydra overrides (for tests,
    deployments and schedules, which pass override strings rather than a config)."""
    from omegaconf import OmegaConf

    cfg = compose_hydra(overrides)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def parse_overrides(overrides: list[str], what: str = "invalid override") -> list[Override]:
    """Hydra's parsed overrides, or ConfigError with `what` and Hydra's reason on one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from bonsai.errors import ConfigError

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(f"{what}: {' '.join(str(e).split())}") from None


def explain_hydra_error(e: Exception) -> str:
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


def compose_checked(overrides: list[str]) -> dict[str, Any]:
    """`compose_config`, with Hydra's and OmegaConf's errors as ConfigError (explained)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bonsai.errors import ConfigError

    try:
        return compose_config(list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(explain_hydra_error(e)) from None
