"""Stage registry. Every module in this package is imported here and each `Stage` subclass with
a `kind` registers itself, so adding a stage means adding its module (and a preset YAML), nothing
else. The modules the stages share (`base`, `common`, `quantize_common`) define no kind."""

from __future__ import annotations

import importlib
import pkgutil

from bonsai.stages.base import REGISTRY, ModelCheck, Stage, StageConfig, StageContext

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def get_stage(kind: str) -> type[Stage]:
    from bonsai.errors import ConfigError

    if kind not in REGISTRY:
        raise ConfigError(
            f"unknown stage kind {kind!r}; valid kinds: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[kind]


__all__ = ["REGISTRY", "ModelCheck", "Stage", "StageConfig", "StageContext", "get_stage"]
