"""The training losses, for single-task (heads None) and multi-task runs alike.

A multi-task model outputs every head's logits side by side (`bonsai.heads`); each loss is then
taken per head, on that head's own columns and labels, and summed with the heads' weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bonsai.heads import Heads


def cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, heads: Heads | None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy; multi-task: the weighted sum of the heads' cross-entropies."""
    if heads is None:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    t = heads.targets(y)
    return sum(  # type: ignore[return-value]
        h.weight * F.cross_entropy(part, t[:, i], label_smoothing=label_smoothing)
        for i, (h, part) in enumerate(zip(heads.heads, heads.split(logits), strict=True))
    )


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    y: torch.Tensor,
    temperature: float,
    alpha: float,
    heads: Heads | None = None,
) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels).

    Logits [B, K]; T softens both distributions, T^2 keeps the soft term's gradient scale.
    Multi-task: per head, each head's softmax over its own columns, summed with the heads'
    weights.
    """
    if heads is None:
        return _hinton(student, teacher, y, temperature, alpha)
    t = heads.targets(y)
    return sum(  # type: ignore[return-value]
        h.weight * _hinton(s, te, t[:, i], temperature, alpha)
        for i, (h, s, te) in enumerate(
            zip(heads.heads, heads.split(student), heads.split(teacher), strict=True)
        )
    )


def _hinton(
    student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, t: float, alpha: float
) -> torch.Tensor:
    """The KD loss of one softmax: logits [B, K], labels [B]."""
    soft = F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student, y)
    return alpha * t * t * soft + (1 - alpha) * hard
