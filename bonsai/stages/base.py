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
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from bonsai.artifacts import Artifact
from bonsai.data import DataBundle

if TYPE_CHECKING:
    from torch import nn


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
    # Where training and fine-tuning run: a resolved torch device string ("cpu", "cuda:0",
    # "mps"; `bonsai.devices.resolve_device`). Models are loaded, saved and exported on the CPU.
    device: str = "cpu"


class ModelCheck:
    """Untrained models built from the pipeline's architecture specs, for checks that need
    layer names and shapes before any compute (`Stage.check_models`). Checks must not modify
    them: they are shared between stages.

    `student` is what the stage starts from (its input's model, or its own `model`); `teacher`
    the teacher stage's model. Each may be given as a model, None, or a function that builds
    it, called on first use (a check that needs no model builds none).
    """

    def __init__(
        self,
        student: nn.Module | Callable[[], nn.Module | None] | None,
        teacher: nn.Module | Callable[[], nn.Module | None] | None,
        input_shape: tuple[int, ...],  # [C, H, W] of the data
        num_classes: int,
        # False when a stage upstream changes the structure (pruned widths, factorized layers):
        # the layer names still hold, the sizes are those of the unchanged architecture.
        exact: bool = True,
    ):
        self._models = {"student": student, "teacher": teacher}
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.exact = exact

    def _get(self, role: str) -> nn.Module | None:
        m = self._models[role]
        if callable(m) and not hasattr(m, "named_modules"):
            m = self._models[role] = m()
        return m  # type: ignore[return-value]

    @property
    def student(self) -> nn.Module | None:
        return self._get("student")

    @property
    def teacher(self) -> nn.Module | None:
        return self._get("teacher")


REGISTRY: dict[str, type[Stage]] = {}


class Stage(ABC):
    kind: ClassVar[str]  # e.g. "quantize.static"; the key in pipeline YAML
    Config: ClassVar[type[StageConfig]]
    # Artifact kinds accepted as input; None in the tuple means "may run without an input".
    consumes: ClassVar[tuple[str | None, ...]]
    produces: ClassVar[str]  # an artifact kind ("torch", "onnx", ...); see `output_kind`
    teacher: ClassVar[str] = "none"  # "none", "optional" or "required": a teacher stage input
    # True when the output's layers differ from its input's architecture spec (pruned channels,
    # replaced layers); the model then reloads through its recorded structure.
    changes_structure: ClassVar[bool] = False

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
    def output_kind(cls, config: StageConfig) -> str:
        """The artifact kind this stage makes with `config`: `produces`, unless the kind depends
        on the config (an `import` of an ONNX file makes onnx, of torch weights torch). The
        graph checks chain kinds by it."""
        return cls.produces

    @classmethod
    def chain_hint(cls, config: StageConfig, wanted: tuple[str, ...]) -> str:
        """When a stage wanting kinds `wanted` is given this stage's output, and it is not one
        of them: how this stage could make one (appended to the graph check's message); ""
        when it cannot."""
        return ""

    @classmethod
    def key_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters as they determine the output, for the cache key (`bonsai.build.
        stage_key`): the parameters themselves, unless the stage reads something outside the
        store, whose content then stands in for its name (an `import` keys on the file's
        sha256, not its path). Raises ConfigError when that content cannot be read."""
        return params

    @classmethod
    def check_inputs(cls, config: StageConfig, input_kind: str | None, has_teacher: bool) -> None:
        """Graph-level checks beyond `consumes`/`teacher` (raise ConfigError); default: none."""
        return None

    @classmethod
    def check_models(cls, config: StageConfig, models: ModelCheck) -> None:
        """Checks that need the models built (layer names, channel counts), run before any
        compute by `bonsai.preflight.check_stage_models`; raise ConfigError("<key>: ...").
        Default: none."""
        return None

    @abstractmethod
    def run(self, ctx: StageContext) -> Artifact:
        """Write this stage's artifact into `ctx.out_dir` and return it."""
