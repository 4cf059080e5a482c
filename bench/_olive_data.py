"""Olive's `user_script` for bench/quantize_search.py: the images Bonsai's side uses, from .npz
files the bench writes (x: float32 [N, C, H, W], y: int64 [N]), as Olive data components.
Runs inside the bench's Olive environment (.venv-olive), imported by Olive, not by Bonsai."""

import numpy as np
import torch
from olive.data.registry import Registry


class _Arrays(torch.utils.data.Dataset):
    def __init__(self, path: str, input_name: str):
        d = np.load(path)
        self.x, self.y, self.name = d["x"].astype(np.float32), d["y"].astype(np.int64), input_name

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {self.name: torch.from_numpy(self.x[i])}, int(self.y[i])


@Registry.register_dataset()
def bonsai_arrays(path: str, input_name: str, **kwargs):
    return _Arrays(path, input_name)


@Registry.register_post_process()
def bonsai_argmax(output, **kwargs):
    """Logits [N, K] -> predicted class [N] (Olive's accuracy compares these with the labels)."""
    logits = output.logits if hasattr(output, "logits") else output
    return torch.as_tensor(np.asarray(logits)).argmax(-1)
