"""Promotion as a declared policy: constraints every candidate must meet, one objective that
ranks those that do, and the rule for when a new winner replaces the current champion.

Pure logic on numbers already measured (no MLflow here): `tasks/registry.py` gathers the
candidates from tracked runs and registers the decision; `flows/promote.py` is the command.

Accuracy decisions are made on the validation split (`data.val_size`), never on the test split:
a policy's `accuracy` (objective, `min_accuracy`, the tie-break) is a candidate's
`val_accuracy`, and `max_accuracy_drop` bounds its `val_accuracy_delta` below the reference
stage. Ranking variants by the test split would pick the one that got lucky on the test images
and report that luck as its accuracy; the test split's numbers are what the tables report.
A candidate measured before Bonsai held out a validation split has no `val_accuracy`: it is
excluded, with that reason, never ranked by its test accuracy instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bonsai.formats import FORMATS

# What a policy may constrain or optimize: metrics every evaluated variant has.
METRICS = ("accuracy", "latency_p50_ms", "bytes", "zipped_bytes", "params", "macs")
Metric = Literal["accuracy", "latency_p50_ms", "bytes", "zipped_bytes", "params", "macs"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The metric a policy's name stands for when it decides: accuracy is the validation split's.
DECIDED_BY = {"accuracy": "val_accuracy", "accuracy_delta": "val_accuracy_delta"}


def decision_metric(metric: str) -> str:
    """The measured metric a policy's `metric` is decided by (`accuracy` -> `val_accuracy`)."""
    return DECIDED_BY.get(metric, metric)


class Constraints(_Strict):
    """Upper bounds (null: no bound). Accuracy drop is in points below the reference stage;
    both accuracy bounds are checked on the validation split."""

    max_bytes: int | None = Field(default=None, ge=0)
    max_zipped_bytes: int | None = Field(default=None, ge=0)
    max_latency_p50_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=100)
    min_accuracy: float | None = Field(default=None, ge=0, le=100)


class Objective(_Strict):
    # `accuracy` ranks by the validation split's accuracy (`decision_metric`).
    metric: Metric
    # min for latency, sizes and counts; max for accuracy (the default follows the metric).
    direction: Literal["min", "max"] | None = None

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "min" if self.direction else self.metric != "accuracy"


class PolicyConfig(_Strict):
    name: str
    # The MLflow registered model the winner goes to; null: bonsai-<data set>-<policy name>,
    # the data set being the one the candidates were measured on (one model per data and policy):
    # an image folder's own name, else `data.name` (bonsai.data.data_set_name).
    model_name: str | None = None
    # Candidates: the variants of one pipeline run (the one just run, or `run_id`), or of
    # every run in the experiment.
    scope: Literal["run", "experiment"] = "run"
    run_id: str | None = None
    # Artifact kinds that may win: formats whose variants are measured here (`bonsai.formats`).
    kinds: tuple[str, ...] = ("onnx",)
    constraints: Constraints = Constraints()
    # Guards a candidate must have passed: `speed_guard` (quantized variants not slower than
    # their fp32 parent). Failed stage gates never produce a candidate at all.
    guards: tuple[Literal["speed_guard"], ...] = ("speed_guard",)
    objective: Objective
    # A new winner replaces the champion only if better by at least this fraction of the
    # champion's value on the objective (latency is re-measured side by side first).
    min_improvement: float = Field(default=0.0, ge=0, lt=1)
    dry_run: bool = False  # print the decision and every verdict, change nothing

    @field_validator("kinds")
    @classmethod
    def _measured_kinds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # A kind nothing here runs (Core ML) has no accuracy or latency to rank it by.
        measured = [k for k, f in FORMATS.items() if f.runs_here]
        wrong = [k for k in v if k not in measured]
        if wrong:
            raise ValueError(
                f"cannot promote {', '.join(map(repr, wrong))}: a candidate's kind must be one "
                f"whose variants are measured here: {', '.join(sorted(measured))}"
            )
        return v

    @field_validator("model_name")
    @classmethod
    def _mlflow_name(cls, v: str | None) -> str | None:
        # MLflow refuses empty names and names with '/' or ':' (mlflow.utils.validation).
        if v is not None and (
            not v.strip() or v != v.strip() or any(c in v for c in "/:") or ".." in v
        ):
            raise ValueError(
                f"{v!r} is not a name MLflow accepts for a registered model: no '/', ':' or "
                "'..', no leading or trailing spaces, not empty"
            )
        return v


@dataclass
class Candidate:
    """One deployable variant, with what was measured when it was built."""

    run_id: str
    stage: str
    model_uri: str
    kind: str  # artifact kind (bonsai.formats)
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # constraints / guards it misses

    @property
    def label(self) -> str:
        return f"{self.stage} (run {self.run_id[:8]})"


def check(c: Candidate, policy: PolicyConfig) -> list[str]:
    """Every constraint and guard `c` misses, each with its numbers."""
    m, k = c.metrics, policy.constraints
    out = []
    if c.kind not in policy.kinds:
        out.append(f"a {c.kind} model; the policy promotes {' or '.join(policy.kinds)} models")
    bounds = (
        ("bytes", k.max_bytes, "max_bytes", "{:,.0f}"),
        ("zipped_bytes", k.max_zipped_bytes, "max_zipped_bytes", "{:,.0f}"),
        ("latency_p50_ms", k.max_latency_p50_ms, "max_latency_p50_ms", "{:.4f}"),
    )
    for metric, bound, name, fmt in bounds:
        if bound is not None and not m.get(metric, math.inf) <= bound:
            out.append(
                f"{metric} {fmt.format(m.get(metric, math.nan))} > {name} {fmt.format(bound)}"
            )
    if "val_accuracy" not in m:
        out.append(
            # Recorded before Bonsai held out a validation split: nothing to decide by.
            "no val_accuracy measured (a run from before the validation split): it is not "
            "ranked by its test accuracy; run its pipeline again to make it a candidate"
            if "accuracy" in m
            else "no val_accuracy measured"
        )
    else:
        if k.max_accuracy_drop is not None:
            if "val_accuracy_delta" not in m:
                out.append("no val_accuracy_delta (its drop below the reference) measured")
            elif not -m["val_accuracy_delta"] <= k.max_accuracy_drop:
                test = 0.0 - m.get("accuracy_delta", math.nan)  # 0.0 -: never "-0.00"
                out.append(
                    f"validation accuracy drop {-m['val_accuracy_delta']:.2f} points > "
                    f"max_accuracy_drop {k.max_accuracy_drop:.2f} (test split: {test:.2f})"
                )
        if k.min_accuracy is not None and not m["val_accuracy"] >= k.min_accuracy:
            out.append(
                f"validation accuracy {m['val_accuracy']:.2f}% < min_accuracy {k.min_accuracy} "
                f"(test split: {m.get('accuracy', math.nan):.2f}%)"
            )
    objective = decision_metric(policy.objective.metric)
    if objective not in m and objective != "val_accuracy":  # a missing val_accuracy: said above
        out.append(f"no {objective} measured")
    if "speed_guard" in policy.guards and m.get("speed_guard_ok", 1.0) < 1:
        out.append(
            f"speed guard failed: {m.get('speedup_vs_parent', math.nan):.2f}x against its fp32 "
            "parent"
        )
    return out


def score(c: Candidate, policy: PolicyConfig) -> tuple[float, float, float]:
    """Sort key, best first: the objective, then validation accuracy, then bytes."""
    value = c.metrics[decision_metric(policy.objective.metric)]
    sign = 1.0 if policy.objective.lower_is_better else -1.0
    return (sign * value, -c.metrics.get("val_accuracy", 0.0), c.metrics.get("bytes", math.inf))


def decide(candidates: list[Candidate], policy: PolicyConfig) -> Candidate | None:
    """Record each candidate's failures in `failed`; return the best that has none."""
    for c in candidates:
        c.failed = check(c, policy)
    ok = [c for c in candidates if not c.failed]
    return min(ok, key=lambda c: score(c, policy)) if ok else None


def beats(new: float, old: float, policy: PolicyConfig) -> bool:
    """Whether objective value `new` beats `old` by at least `min_improvement`."""
    margin = policy.min_improvement * abs(old)
    if policy.objective.lower_is_better:
        return new < old - margin
    return new > old + margin
