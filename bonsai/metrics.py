"""Accuracy metrics, for single-task (heads None) and multi-task runs alike: a multi-task run
reports each head's top-1 (`accuracy_<name>`) and `accuracy` = the mean over heads, and a
variant's drop below its parent is the worst head's."""

from __future__ import annotations

import numpy as np

from bonsai.heads import Heads, labels, predictions


def accuracy(logits, y, heads: Heads | None) -> float:
    """Top-1 in percent; multi-task: the mean of the heads' accuracies."""
    p, t = np.asarray(predictions(logits, heads)), np.asarray(labels(y, heads))
    return 100.0 * float((p == t).mean())


def head_accuracies(logits, y, heads: Heads | None) -> dict[str, float]:
    """{head name: top-1 percent}; empty for a single-task run."""
    if heads is None:
        return {}
    p, t = np.asarray(predictions(logits, heads)), np.asarray(labels(y, heads))
    return {n: 100.0 * float((p[:, i] == t[:, i]).mean()) for i, n in enumerate(heads.names)}


def worst_drop(parent_logits, logits, y, heads: Heads | None) -> float:
    """The largest accuracy drop (points) of any head from `parent_logits` to `logits`."""
    if heads is None:
        return accuracy(parent_logits, y, None) - accuracy(logits, y, None)
    before = head_accuracies(parent_logits, y, heads)
    after = head_accuracies(logits, y, heads)
    return max(before[n] - after[n] for n in heads.names)
