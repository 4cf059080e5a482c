"""Finding layers by name in any model: weight layers, the classifier head, user-named layers."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from bonsai.errors import ConfigError

# Layers with a weight matrix that pruning and factorization act on.
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
WeightLayer = nn.modules.conv._ConvNd | nn.Linear


def weight_layers(model: nn.Module) -> dict[str, WeightLayer]:
    """Every conv and linear layer, by qualified name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


def classifier_head(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> str | None:
    """The name of the layer that computes the logits: of the conv/linear layers run by a
    forward pass, the last whose output has `num_classes` channels (works for `fc`,
    `classifier.3`, a 1x1-conv head, and layers wrapped in user code)."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.append((name, out)))
        for name, m in weight_layers(model).items()
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, out in reversed(seen):
        if isinstance(out, torch.Tensor) and out.ndim >= 2 and out.shape[1] == num_classes:
            return name
    return seen[-1][0] if seen else None


def unknown_names_message(
    key: str, unknown: list[str], valid: list[str], what: str = "layer"
) -> str:
    """`<key>: no <what> named ...; did you mean ...? valid names: ...` (every valid name)."""
    hints = sorted({h for n in unknown for h in difflib.get_close_matches(n, valid, n=3)})
    maybe = f"; did you mean {', '.join(map(repr, hints))}? " if hints else "; "
    return (
        f"{key}: no {what} named {', '.join(map(repr, unknown))} in the model (got "
        f"{unknown!r}){maybe}valid names: {', '.join(valid)}"
    )


def resolve_weight_layers(model: nn.Module, names: list[str], key: str) -> dict[str, WeightLayer]:
    """The conv/linear layers `names` refer to: a layer's own name, or a containing module's
    name (which covers every conv/linear inside it). Unknown names raise ConfigError listing
    the valid layer names."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if not n or n not in modules]
    if unknown:
        valid = list(weight_layers(model))
        raise ConfigError(
            unknown_names_message(key, unknown, valid)
            + " (or the name of a module containing them)"
        )
    out: dict[str, WeightLayer] = {}
    for n in names:
        for sub_name, sub in modules[n].named_modules(prefix=n):
            if isinstance(sub, WEIGHT_LAYERS):
                out[sub_name] = sub
    return out
