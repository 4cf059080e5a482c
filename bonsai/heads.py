"""Multi-task models: one shared backbone, one classification head per task.

A data config may declare `heads`, each a task whose labels derive from the data's own classes:

    data:
      heads:
        - {name: digit, labels: classes}              # the data's own 10 classes
        - {name: parity, labels: even_odd, weight: 0.5}  # a built-in mapping
        - {name: coarse, labels: {small: ["0", "1"], big: ["2", ..., "9"]}}  # a declared mapping

Every model of such a run outputs the heads' logits side by side, `[B, K_1 + K_2 + ...]` (head h
owns columns offsets[h] .. offsets[h] + K_h: its own rows of the final linear layer, on the
shared features), so every stage that trains, prunes, factorizes, quantizes or exports a model
keeps all heads without knowing about them; what differs per head is the heads' layout (here)
and what is computed on it:
- the loss: a weighted sum of the heads' cross-entropies (and of their KD terms, each head's
  softmax taken over its own columns), `bonsai.losses`;
- accuracy: per head (`accuracy_<name>`), and `accuracy` = the mean over heads, `bonsai.metrics`;
- export: one named ONNX output per head (`bonsai.onnx_utils.export_onnx(heads=...)`).

With no `heads` a run is single-task, as before. A single head with a mapping trains a
single-task model on a derived label (e.g. parity alone), the model a multi-head one replaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bonsai.errors import ConfigError

# Built-in label mappings: name -> function(class names) -> {label: [class names]}, raising
# ConfigError when the data's classes do not fit the mapping.
CIFAR10_VEHICLES = ("airplane", "automobile", "ship", "truck")
CIFAR10_ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")


def _even_odd(classes: tuple[str, ...], key: str) -> dict[str, list[str]]:
    bad = [c for c in classes if not re.fullmatch(r"-?\d+", c)]
    if bad:
        raise ConfigError(
            f"{key}=even_odd maps integer class names by parity, but the data's classes include "
            f"{bad[:3]}; declare the mapping instead: {{even: [...], odd: [...]}}"
        )
    return {
        "even": [c for c in classes if int(c) % 2 == 0],
        "odd": [c for c in classes if int(c) % 2 == 1],
    }


def _animal_vehicle(classes: tuple[str, ...], key: str) -> dict[str, list[str]]:
    known = set(CIFAR10_ANIMALS) | set(CIFAR10_VEHICLES)
    bad = [c for c in classes if c not in known]
    if bad:
        raise ConfigError(
            f"{key}=animal_vehicle maps CIFAR-10's class names ({', '.join(sorted(known))}), "
            f"but the data's classes include {bad[:3]}; declare the mapping instead: "
            "{animal: [...], vehicle: [...]}"
        )
    return {
        "animal": [c for c in classes if c in CIFAR10_ANIMALS],
        "vehicle": [c for c in classes if c in CIFAR10_VEHICLES],
    }


MAPPINGS = {"even_odd": _even_odd, "animal_vehicle": _animal_vehicle}
_NO_LABELS = (
    "set labels to `classes` (the data's own classes), a built-in mapping ("
    + ", ".join(sorted(MAPPINGS))
    + ") or a mapping {label: [class, ...]}"
)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


class HeadConfig(BaseModel):
    """One task: its name (the ONNX output and metric suffix), its labels, its loss weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    # `classes` (the data's own classes), a built-in mapping (even_odd, animal_vehicle) or a
    # declared mapping {label: [class, ...]} that puts every class of the data under one label.
    labels: str | dict[str, list[str]] | None = None
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)  # of this head's loss term

    @model_validator(mode="after")
    def _has_labels(self):
        if self.labels is None:  # the default: validators of fields left out do not run
            raise ValueError(f"head {self.name!r} has no labels: {_NO_LABELS}")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.fullmatch(v):
            raise ValueError(
                f"head name {v!r} must be an identifier (letters, digits, _; at most 40): it "
                "names the ONNX output and the accuracy_<name> metric"
            )
        return v

    @field_validator("labels", mode="after")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if v is None:
            raise ValueError(_NO_LABELS)
        if isinstance(v, str) and v != "classes" and v not in MAPPINGS:
            raise ValueError(
                f"unknown label mapping {v!r}; valid: classes, {', '.join(sorted(MAPPINGS))}, "
                "or a mapping {label: [class, ...]}"
            )
        if isinstance(v, dict):
            if len(v) < 2:
                raise ValueError(f"a mapping needs at least 2 labels, got {sorted(v)}")
            empty = [k for k, members in v.items() if not members]
            if empty:
                raise ValueError(f"label(s) {empty} list no class; give each at least one")
        return v


def check_head_list(heads: list[HeadConfig]) -> list[HeadConfig]:
    """Names unique, weights not all zero (pydantic validator of `data.heads`)."""
    names = [h.name for h in heads]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"head names must be unique, {dup} appear twice")
    if heads and not any(h.weight > 0 for h in heads):
        raise ValueError(
            "every head has weight 0, so nothing would be learned; give at least one head a "
            "positive weight"
        )
    return heads


@dataclass(frozen=True)
class Head:
    name: str
    classes: tuple[str, ...]  # this head's labels
    table: tuple[int, ...]  # data class index -> this head's label index
    weight: float


@dataclass(frozen=True)
class Heads:
    heads: tuple[Head, ...]

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.heads]

    @property
    def sizes(self) -> list[int]:
        return [len(h.classes) for h in self.heads]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def slices(self) -> list[slice]:
        out, start = [], 0
        for k in self.sizes:
            out.append(slice(start, start + k))
            start += k
        return out

    def split(self, logits):
        """Per-head logits [B, K_h] of concatenated logits [B, sum K] (torch or numpy)."""
        return [logits[:, s] for s in self.slices()]

    def targets(self, y):
        """Per-head labels [N, H] of the data's class labels [N] (torch or numpy)."""
        if isinstance(y, torch.Tensor):
            tables = [torch.tensor(h.table, dtype=torch.int64, device=y.device) for h in self.heads]
            return torch.stack([t[y] for t in tables], dim=1)
        y = np.asarray(y)
        return np.stack([np.asarray(h.table, dtype=np.int64)[y] for h in self.heads], axis=1)

    def describe(self) -> list[dict[str, Any]]:
        """For artifact metadata: what each output column block means."""
        return [
            {"name": h.name, "classes": list(h.classes), "weight": h.weight} for h in self.heads
        ]


def resolve_heads(heads: list[HeadConfig], classes: tuple[str, ...]) -> Heads | None:
    """The heads' label tables for the data's classes; None for a single-task run. Raises
    ConfigError naming the key, the value and the fix."""
    if not heads:
        return None
    out = []
    for i, h in enumerate(heads):
        key = f"data.heads.{i}.labels"
        if h.labels == "classes":
            mapping = {c: [c] for c in classes}
        elif isinstance(h.labels, str):
            mapping = MAPPINGS[h.labels](tuple(classes), key)
        else:
            assert isinstance(h.labels, dict), "validated by HeadConfig"
            mapping = {str(k): [str(c) for c in v] for k, v in h.labels.items()}
        label_of: dict[str, int] = {}
        for j, members in enumerate(mapping.values()):
            for c in members:
                if c not in classes:
                    raise ConfigError(
                        f"{key}: head {h.name!r} maps class {c!r}, which the data does not "
                        f"have; the data's classes: {list(classes)}"
                    )
                if c in label_of:
                    raise ConfigError(
                        f"{key}: head {h.name!r} puts class {c!r} under two labels; each class "
                        "belongs to exactly one"
                    )
                label_of[c] = j
        missing = [c for c in classes if c not in label_of]
        if missing:
            raise ConfigError(
                f"{key}: head {h.name!r} gives no label to class(es) {missing[:5]}: every image "
                "needs a label for every head; add them to one of "
                f"{sorted(mapping)}"
            )
        out.append(Head(h.name, tuple(mapping), tuple(label_of[c] for c in classes), h.weight))
    return Heads(tuple(out))


# ---------------------------------------------------------------------------------------------
# What every stage computes, for single-task (heads None) and multi-task runs alike.


def num_outputs(num_classes: int, heads: Heads | None) -> int:
    """Logit columns a model outputs."""
    return num_classes if heads is None else heads.total


def predictions(logits, heads: Heads | None):
    """Predicted labels: [N] single-task, [N, H] multi-task (numpy or torch, like `logits`)."""
    if heads is None:
        return logits.argmax(1)
    parts = [p.argmax(1) for p in heads.split(logits)]
    return torch.stack(parts, 1) if isinstance(logits, torch.Tensor) else np.stack(parts, 1)


def labels(y, heads: Heads | None):
    """True labels in the layout of `predictions`."""
    return y if heads is None else heads.targets(y)


def heads_from_meta(meta: dict[str, Any]) -> list[tuple[str, int]] | None:
    """(output name, columns) per head from an artifact's `meta.model`, for export; None for a
    single-task model."""
    heads = (meta or {}).get("heads")
    if not heads:
        return None
    return [(str(h["name"]), len(h["classes"])) for h in heads]


# ---------------------------------------------------------------------------------------------
# The single-task models a multi-task one replaces: same backbone, same format, one head each.
