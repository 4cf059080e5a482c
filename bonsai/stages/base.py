"""The stage contract: one compression step, one class, registered by its `kind`.

A stage takes its input artifact (none for `train`; a stage that learns from a teacher also gets
the teacher's artifact), writes exactly one artifact into `ctx.out_dir`, and returns it. It never
touches tracking or orchestration: those live in `tasks/` and `flows/`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from bonsai.artifacts import Artifact
from bonsai.data import DataBundle


class StageConfig(BaseModel):
    """A stage's own parameters. Unknown keys are errors; configs are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageContext:
    name: str  # the stage's name in the pipeline, e.g. "student"
    data: DataBundle
    out_dir: Path  # an empty directory the stage writes its artifact into
    input: Artifact | None = None
    teacher: Artifact | None = None
    seed: int = 0
    progress: bool = True  # show per-epoch progress bars
    log: Callable[[str], None] = field(default=print)
    # An ONNX export of `input` (opset 18, dynamic batch) the evaluator already made and
    # verified, when it has one: a stage that exports may copy it instead of exporting again.
    input_onnx: Path | None = None


REGISTRY: dict[str, type[Stage]] = {}


class Stage(ABC):
    kind: ClassVar[str]  # e.g. "quantize.static"; the key in pipeline YAML
    Config: ClassVar[type[StageConfig]]
    # Artifact kinds accepted as input; None in the tuple means "may run without an input".
    consumes: ClassVar[tuple[str | None, ...]]
    produces: ClassVar[str]  # "torch" or "onnx"
    teacher: ClassVar[str] = "none"  # "none", "optional" or "required": a teacher stage input

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return
        if kind in REGISTRY and REGISTRY[kind] is not cls:
            raise TypeError(f"stage kind {kind!r} registered twice: {REGISTRY[kind]} and {cls}")
        REGISTRY[kind] = cls

    def __init__(self, config: StageConfig):
        self.config = config

    @classmethod
    def check_inputs(cls, config: StageConfig, input_kind: str | None, has_teacher: bool) -> None:
        """Graph-level checks beyond `consumes`/`teacher` (raise ConfigError); default: none."""
        return None

    @abstractmethod
    def run(self, ctx: StageContext) -> Artifact:
        """Write this stage's artifact into `ctx.out_dir` and return it."""
