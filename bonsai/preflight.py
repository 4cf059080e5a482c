"""Checks that need the pipeline's models built, run before any compute.

Layer names (`ignore`, feature hints) and channel counts (a pruning ratio that would empty a
layer) can only be checked against a model. `check_stage_models` builds, once per architecture
spec, the untrained model each stage starts from (and its teacher's) and hands them to the
stage's `check_models` hook. Called by `flows.compress.prepare` after the config and graph are
valid and before any run is created; the CLI then exits 2.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from bonsai.config import Plan
from bonsai.errors import ConfigError
from bonsai.models import build_model
from bonsai.stages import REGISTRY, ModelCheck, Stage


def output_spec(plan: Plan, name: str | None) -> tuple[dict[str, Any] | None, bool]:
    """(architecture spec of stage `name`'s torch output, whether its structure is exactly the
    spec's). Stages without a `model` of their own pass their input's architecture on."""
    if name is None:
        return None, True
    stage = plan[name]
    spec = getattr(stage.config, "model", None)
    if spec is not None:
        return spec, True
    if stage.input is None:
        return None, True
    spec, exact = output_spec(plan, stage.input)
    return spec, exact and not REGISTRY[stage.kind].changes_structure


def check_stage_models(plan: Plan, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Run every stage's `check_models` hook; raise one ConfigError listing every problem."""
    built: dict[str, nn.Module | None] = {}

    def model(spec: dict[str, Any] | None) -> nn.Module | None:
        if spec is None:
            return None
        key = json.dumps(spec, sort_keys=True)
        if key not in built:
            try:
                with torch.random.fork_rng(devices=[]):  # leave the run's random stream alone
                    built[key] = build_model(spec, input_shape[0], num_classes).eval()
            except Exception:  # noqa: BLE001 - unbuildable specs are reported by other checks
                built[key] = None
        return built[key]

    problems: list[str] = []
    for s in plan.stages:
        cls = REGISTRY[s.kind]
        if cls.check_models.__func__ is Stage.check_models.__func__:  # type: ignore[attr-defined]
            continue
        if s.input is not None:
            spec, exact = output_spec(plan, s.input)
        else:
            spec, exact = getattr(s.config, "model", None), True
        teacher_spec, _ = output_spec(plan, s.teacher)
        check = ModelCheck(
            student=lambda spec=spec: model(spec),  # type: ignore[misc]
            teacher=lambda spec=teacher_spec: model(spec),  # type: ignore[misc]
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            exact=exact,
        )
        try:
            cls.check_models(s.config, check)
        except ConfigError as e:
            problems.append(f"pipeline.stages.{s.name}.{e}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
