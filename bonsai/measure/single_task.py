"""The single-task models a multi-task variant replaces: the same backbone, format and
precision, cut to one head's output, so the comparison can say what one multi-head model saves
in bytes and latency against one model per task.
"""

from __future__ import annotations

import torch

from bonsai.heads import Heads


def single_task_torch(model, heads: Heads, input_shape: tuple[int, ...]) -> list:
    """One copy of `model` per head whose final layer keeps only that head's rows: the model a
    product would ship for that task alone (same backbone, same structure)."""
    import copy

    from torch import nn

    from bonsai.layers import classifier_head

    name = classifier_head(model, input_shape, heads.total)
    layer = model.get_submodule(name) if name else None
    if not isinstance(layer, nn.Linear | nn.Conv2d):
        return []
    parent_path, _, attr = name.rpartition(".")  # type: ignore[union-attr]
    out = []
    for s in heads.slices():
        twin = copy.deepcopy(model)
        parent = twin.get_submodule(parent_path) if parent_path else twin
        old = getattr(parent, attr)
        new: nn.Linear | nn.Conv2d
        if isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, s.stop - s.start, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, s.stop - s.start, old.kernel_size,
                            old.stride, old.padding, bias=old.bias is not None)  # fmt: skip
        with torch.no_grad():
            new.weight.copy_(old.weight[s])
            if old.bias is not None and new.bias is not None:
                new.bias.copy_(old.bias[s])
        setattr(parent, attr, new)
        out.append(twin.eval())
    return out


def single_task_onnx(path, heads: Heads, out_dir) -> list:
    """One ONNX file per head: `path`'s graph cut to that head's output (onnx's extractor keeps
    only the nodes it needs). The classifier's weights still hold every head's rows: a few
    hundred bytes more than a model built for the one task."""
    from pathlib import Path

    import onnx

    model = onnx.load(str(path))
    inputs = [i.name for i in model.graph.input]
    outs = []
    for name in heads.names:
        dst = Path(out_dir) / f"single-{name}.onnx"
        extracted = onnx.utils.Extractor(model).extract_model(inputs, [name])
        onnx.save(extracted, str(dst))
        outs.append(dst)
    return outs
