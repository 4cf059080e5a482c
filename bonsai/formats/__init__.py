"""The table of artifact formats. Every module in this package defining a `Format` subclass with a
`kind` is imported here, so adding a format means adding its module (and the export stage that
makes it, with its preset YAML), nothing else: the store, the evaluator, the footprint, the
predictor, tracking and promotion ask this table instead of checking kinds or file names."""

from __future__ import annotations

import importlib
import pkgutil

from bonsai.formats.base import (
    FORMATS,
    Format,
    Session,
    StoredArtifact,
    format_of_file,
    get_format,
    open_session,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "FORMATS",
    "Format",
    "Session",
    "StoredArtifact",
    "format_of_file",
    "get_format",
    "open_session",
]
