"""The run configuration as typed, strict schemas, and the stage graph built from it.

Hydra composes `conf/` into a plain dict; `validate_config` turns it into a `RunConfig` and a
`Plan` (the stages in dependency order) or raises one `ConfigError` listing every problem with its
key, its bad value and the valid options — before any data is loaded or any run is created.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bonsai.data import DataConfig
from bonsai.devices import DeviceName
from bonsai.errors import ConfigError
from bonsai.measure import latency
from bonsai.models import DEFAULT_ALLOWED_MODULES, resolve_target
from bonsai.promotion import Constraints, Objective, PolicyConfig
from bonsai.store import is_safe_stage_name

GRAPH_KEYS = ("kind", "input", "teacher")
_MODULE_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineConfig(_Strict):
    name: str = "default"
    # The stage every variant is compared against (ratios, accuracy delta, agreement).
    reference: str
    stages: dict[str, dict[str, Any]] = Field(min_length=1)


class EvalConfig(_Strict):
    threads: int = Field(default=latency.THREADS, ge=1)  # onnxruntime intra-op threads
    warmup: int = Field(default=latency.WARMUP, ge=0)
    repeats: int = Field(default=latency.REPEATS, ge=10)  # timed batch-1 runs per model
    batch_size: int = Field(default=256, ge=1)  # for accuracy passes
    # Side-by-side latency in the final comparison: rounds x repeats_per_round per model.
    compare_rounds: int = Field(default=latency.ROUNDS, ge=1)
    compare_repeats: int = Field(default=latency.PER_ROUND, ge=1)
    # Deployable footprint per variant: runtime library bytes and the peak memory of one
    # batch-1 inference in a fresh process (a second or two per variant).
    footprint: bool = True

    @field_validator("threads")
    @classmethod
    def _at_most_the_cores(cls, v: int) -> int:
        return min(v, usable_cpus())  # eval.threads=10000 would start 10,000 threads


def usable_cpus() -> int:
    """The cores this process may run on: the cap of every thread count in the config."""
    return len(os.sched_getaffinity(0))


class TrackingConfig(_Strict):
    # None: sqlite:///<store_dir>/mlflow.db. Any MLflow URI (http://host:5000) works.
    uri: str | None = None
    store_dir: str  # local store: sqlite DB, artifacts, Bonsai's stage outputs
    experiment: str = "bonsai"


class RuntimeConfig(_Strict):
    progress: bool = True  # per-epoch progress bars
    max_workers: int = Field(default=2, ge=1)  # stages run concurrently (independent branches)
    # Total CPU threads to use; torch threads per stage = cpus // concurrent stages. None: all.
    cpus: int | None = Field(default=None, ge=1)
    # Cap on every stage's `epochs` (debug=fast sets 1). None: no cap.
    max_epochs: int | None = Field(default=None, ge=1)
    # Stages to recompute even when a cached result exists: stage names, or ["all"].
    force: list[str] = Field(default_factory=list)
    # Where concurrent stages run: "threads" (this process) or "dask" (worker processes of a
    # Dask cluster: a local one, or the scheduler at dask_address).
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = Field(default=None, pattern=r"^(tcp|tls|ucx|inproc)://\S+$")
    # Where training, distillation, fine-tuning and QAT run (bonsai.devices): auto = a CUDA GPU
    # when torch sees one, else the CPU. Evaluation stays in onnxruntime on the CPU. Not part of
    # any stage's cache key.
    device: DeviceName = "auto"

    @field_validator("cpus")
    @classmethod
    def _cpus_at_most_the_cores(cls, v: int | None) -> int | None:
        return None if v is None else min(v, usable_cpus())

    @field_validator("force", mode="before")
    @classmethod
    def _force_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class CompareConfig(_Strict):
    """`python -m flows.compare`: which pipeline runs to put side by side."""

    runs: list[str] = Field(default_factory=list)  # run ids; empty: every finished pipeline run
    last: int | None = Field(default=None, ge=1)  # only the newest N of them
    pipeline: str | None = None  # only runs of this pipeline


class ReplayConfig(_Strict):
    """`python -m flows.replay <model>`: what counts as reproduced."""

    # Accuracy, params, MACs and bytes must match exactly (fixed seed, CPU); latency within
    # this relative tolerance of the original (batch-1 latency drifts by ±30 % on a shared
    # machine, measured on the 2-core reference machine).
    latency_tolerance: float = Field(default=0.5, gt=0, allow_inf_nan=False)


class ModelsConfig(_Strict):
    """Where a `_target_` may come from (bonsai/models.py: resolve_target)."""

    # Import prefixes a `_target_` may name in a run started from a deployment (its parameters
    # come from whoever may trigger it). A shell command may import any module; either way the
    # target must be an nn.Module class.
    allowed_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOWED_MODULES))

    @field_validator("allowed_modules")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if not _MODULE_PREFIX.match(p)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module path like my_pkg or my_pkg.nets")
        return v


class RunConfig(_Strict):
    seed: int = 0
    data: DataConfig
    # Architecture specs the pipeline refers to by interpolation (${teacher}, ${student}).
    teacher: dict[str, Any] | None = None
    student: dict[str, Any] | None = None
    models: ModelsConfig = ModelsConfig()
    pipeline: PipelineConfig
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig
    runtime: RuntimeConfig = RuntimeConfig()
    # A promotion policy (conf/promote/): applied at the end of the pipeline when given.
    promote: PolicyConfig | None = None
    compare: CompareConfig = CompareConfig()
    replay: ReplayConfig = ReplayConfig()

    @field_validator("teacher", "student")
    @classmethod
    def _spec(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # A `_target_` is refused by what it resolves to even where no stage builds it (the
        # stages' own validators report the rest under their keys).
        if isinstance(v, dict) and "_target_" in v:
            try:
                resolve_target(v["_target_"])
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: str
    input: str | None
    teacher: str | None
    config: Any  # the stage's validated StageConfig
    params: dict[str, Any]  # the stage's parameters as written (resolved)

    def seed(self, run_seed: int) -> int:
        """A per-stage seed: independent branches do not share random streams."""
        return (run_seed * 1_000_003 + zlib.crc32(self.name.encode())) % 2**31


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]  # in dependency order
    reference: str
    force: frozenset[str] = frozenset()  # stages to recompute despite a cached result

    def forced(self, name: str) -> bool:
        return "all" in self.force or name in self.force

    def __getitem__(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def width(self) -> int:
        """Most stages that can run at once (the largest level of the DAG)."""
        level: dict[str, int] = {}
        for s in self.stages:
            deps = [d for d in (s.input, s.teacher) if d]
            level[s.name] = 1 + max((level[d] for d in deps), default=-1)
        counts: dict[int, int] = {}
        for v in level.values():
            counts[v] = counts.get(v, 0) + 1
        return max(counts.values())


def _valid_keys(loc: tuple) -> list[str] | None:
    """The keys allowed at the mapping that holds `loc`'s last element, for error messages."""
    from bonsai.data import DigitsData, ImageFolderData, SyntheticData, TorchvisionData

    parent = tuple(str(p) for p in loc[:-1])
    schemas: dict[tuple, type[BaseModel]] = {
        (): RunConfig,
        ("pipeline",): PipelineConfig,
        ("eval",): EvalConfig,
        ("tracking",): TrackingConfig,
        ("runtime",): RuntimeConfig,
        ("promote",): PolicyConfig,
        ("compare",): CompareConfig,
        ("replay",): ReplayConfig,
        ("promote", "constraints"): Constraints,
        ("promote", "objective"): Objective,
    }
    for cls in (DigitsData, SyntheticData, ImageFolderData, TorchvisionData):
        for tag in cls.model_fields["name"].annotation.__args__:  # type: ignore[union-attr]
            schemas[("data", tag)] = cls
    model = schemas.get(parent)
    return sorted(model.model_fields) if model else None


def _fmt_errors(e: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> list[str]:
    out = []
    for err in e.errors():
        loc = err["loc"]
        shown_loc = list(loc)
        if len(loc) >= 2 and loc[0] == "data" and not prefix:
            del shown_loc[1]  # pydantic puts the union's tag in the path: data.digits.x -> data.x
        path = ".".join(str(p) for p in (prefix, *shown_loc) if p != "")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            keys = sorted(model.model_fields) if model else _valid_keys(loc)
            msg = f"unknown key; valid keys: {', '.join(keys)}" if keys else "unknown key"
        elif err["type"] == "union_tag_invalid":
            msg = msg.replace("Input tag", "unknown data name")
        # A whole-config check (a model validator, empty loc) names its own values.
        shown = "" if err["type"] == "missing" or not loc else f" (got {err.get('input')!r})"
        out.append(f"{path}: {msg}{shown}")
    return out


def validate_config(raw: dict[str, Any]) -> tuple[RunConfig, Plan]:
    """Validate the composed config and the stage graph; raise one ConfigError listing all issues."""
    from bonsai.formats import get_format
    from bonsai.stages import REGISTRY

    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = _fmt_errors(e, "")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None

    problems: list[str] = []
    stages = cfg.pipeline.stages
    parsed: dict[str, StagePlan] = {}
    for name, spec in stages.items():
        where = f"pipeline.stages.{name}"
        if not is_safe_stage_name(name):
            problems.append(
                f"pipeline.stages: stage name {name!r} is not allowed; a stage name becomes a "
                "folder, a run name and a metric prefix: use ASCII letters, digits, _ and - "
                "(starting with a letter or _, at most 64 characters)"
            )
            continue
        if not isinstance(spec, dict):
            problems.append(f"{where}: must be a mapping with `kind` and parameters (got {spec!r})")
            continue
        kind = spec.get("kind")
        if kind not in REGISTRY:
            problems.append(
                f"{where}.kind: unknown stage kind {kind!r}; valid kinds: {', '.join(sorted(REGISTRY))}"
            )
            continue
        stage_cls = REGISTRY[kind]
        params = {k: v for k, v in spec.items() if k not in GRAPH_KEYS}
        try:
            config = stage_cls.Config.model_validate(params)
        except ValidationError as e:
            problems += _fmt_errors(e, where, stage_cls.Config)
            continue
        except ConfigError as e:  # raised by field validators (e.g. model specs)
            problems.append(f"{where}: {e}")
            continue
        parsed[name] = StagePlan(name, kind, spec.get("input"), spec.get("teacher"), config, params)

    def makes(name: str) -> str:
        """The artifact kind stage `name` makes (an `import` makes what its file holds)."""
        return REGISTRY[parsed[name].kind].output_kind(parsed[name].config)

    def hint(name: str, wanted: tuple[str, ...]) -> str:
        """How stage `name` could make one of `wanted` instead, as the end of a message."""
        text = REGISTRY[parsed[name].kind].chain_hint(parsed[name].config, wanted)
        return f"; {text}" if text else ""

    # Edges: every referenced stage exists, kinds chain, teachers where needed.
    for s in parsed.values():
        cls = REGISTRY[s.kind]
        where = f"pipeline.stages.{s.name}"
        for role, ref in (("input", s.input), ("teacher", s.teacher)):
            if ref is not None and ref not in stages:
                problems.append(
                    f"{where}.{role}: no stage named {ref!r}; stages: {', '.join(stages)}"
                )
        input_kind = None
        if s.input is not None and s.input in parsed:
            input_kind = makes(s.input)
        if s.input is not None and s.input in parsed and input_kind not in cls.consumes:
            accepted = tuple(k for k in cls.consumes if k)
            takes = f"takes {' or '.join(accepted)} models" if accepted else "takes no input"
            problems.append(
                f"{where}.input: {s.kind} {takes}, but stage "
                f"{s.input!r} ({parsed[s.input].kind}) produces {input_kind}"
                + hint(s.input, accepted)
            )
        if s.input is None and None not in cls.consumes:
            problems.append(
                f"{where}.input: {s.kind} needs an input stage producing "
                f"{' or '.join(k for k in cls.consumes if k)}"
            )
        if cls.teacher == "required" and s.teacher is None:
            problems.append(f"{where}.teacher: {s.kind} needs a teacher stage (a torch model)")
        if cls.teacher == "none" and s.teacher is not None:
            problems.append(f"{where}.teacher: {s.kind} takes no teacher (got {s.teacher!r})")
        if s.teacher in parsed and not get_format(makes(s.teacher)).holds_module:
            problems.append(
                f"{where}.teacher: the teacher must be a torch model; stage {s.teacher!r} "
                f"({parsed[s.teacher].kind}) produces {makes(s.teacher)}"
                + hint(s.teacher, ("torch",))
            )
        try:
            cls.check_inputs(s.config, input_kind, s.teacher is not None)
        except ConfigError as e:
            problems.append(f"{where}: {e}")
    unknown_force = [n for n in cfg.runtime.force if n != "all" and n not in stages]
    if unknown_force:
        problems.append(
            f"runtime.force: no stage named {', '.join(map(repr, unknown_force))}; "
            f"use stage names ({', '.join(stages)}) or all"
        )
    if cfg.pipeline.reference not in stages:
        problems.append(
            f"pipeline.reference: no stage named {cfg.pipeline.reference!r}; stages: {', '.join(stages)}"
        )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))

    order = _toposort(parsed)
    return cfg, Plan(
        tuple(parsed[n] for n in order), cfg.pipeline.reference, frozenset(cfg.runtime.force)
    )


def _toposort(stages: dict[str, StagePlan]) -> list[str]:
    deps = {n: {d for d in (s.input, s.teacher) if d} for n, s in stages.items()}
    order: list[str] = []
    ready = [n for n in stages if not deps[n]]  # declaration order among ready stages
    remaining = {n: set(d) for n, d in deps.items() if d}
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in list(remaining):
            remaining[m].discard(n)
            if not remaining[m]:
                del remaining[m]
                ready.append(m)
    if remaining:
        cycle = " -> ".join(sorted(remaining))
        raise ConfigError(
            f"invalid configuration:\n  pipeline.stages: the stages {cycle} depend on each other in "
            "a cycle (through `input`/`teacher`); a pipeline must be acyclic"
        )
    return order
