"""Test models that no library ships, referenced by `_target_: tests.nets.<Class>`.

`ResidualDepthwiseSE` combines the structures that make channel pruning hard: residual adds
(the channels on both sides of a `+` must go together), depthwise convs (groups == channels:
their channels follow their input's) and squeeze-and-excitation gates (a per-channel multiply
fed by a side branch). Any stage that claims to work on "any model" is tested on it.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(avgpool(x))))): per-channel gates from a bottleneck [B, C, 1, 1]."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean((2, 3), keepdim=True)  # [B, C, 1, 1]
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(g))))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride s) -> SE gate -> 1x1 project, plus the input when the
    shape is unchanged (MobileNetV2/EfficientNet's block)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 4):
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        )
        self.se = SqueezeExcite(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class ResidualDepthwiseSE(nn.Module):
    """Stem conv -> 2 residual blocks at `width` -> a stride-2 block to 2 x width -> 1 residual
    block -> global average pool -> linear head. Input [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            InvertedResidual(width, width),
            InvertedResidual(width, width),
            InvertedResidual(width, 2 * width, stride=2),
            InvertedResidual(2 * width, 2 * width),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ErfinvHead(nn.Module):
    """A linear classifier on erfinv(tanh(x) / 2): an operator neither Core ML's nor LiteRT's
    converter implements, for the mobile exports' refusal messages."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 8):
        super().__init__()
        self.fc = nn.Linear(in_channels * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.special.erfinv(torch.tanh(x.flatten(1)) * 0.5))


class GrayscaleOnly(nn.Module):
    """A user's network written for one-channel images: its constructor refuses any other
    channel count, as hand-written nets with an assert or a check do."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        if in_channels != 1:
            raise ValueError(f"GrayscaleOnly takes 1-channel images, got in_channels={in_channels}")
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))
