"""Errors Bonsai raises for problems a user can fix. Each message names the problem and the fix."""


class BonsaiError(Exception):
    """Base class: a user-facing problem, reported without a traceback by the CLI."""


class ConfigError(BonsaiError):
    """The composed configuration or the stage graph is invalid."""


class DataError(BonsaiError):
    """The dataset is missing, empty or inconsistent with the model."""


class ArtifactError(BonsaiError):
    """A stored artifact is missing, corrupted or of the wrong kind."""


class GateError(BonsaiError):
    """A stage's own quality gate failed (export parity, accuracy drop)."""


class StageFailed(BonsaiError):
    """A pipeline stage raised; the message names the stage and the cause."""


class TrainingDiverged(BonsaiError):
    """The loss became NaN or infinite: the stage fails at once instead of caching NaN weights."""


class NothingToPromote(BonsaiError):
    """No variant satisfies the promotion policy: no version registered, no alias moved."""
