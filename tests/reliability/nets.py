"""Deliberately mismatched user models, referenced by `_target_` in the bad-input tests."""

from torch import nn


class TenClassNet(nn.Module):
    """Ignores the data: always 10 outputs from 1x8x8 images (takes no num_classes argument)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class RGBOnlyNet(nn.Module):
    """Expects 3-channel images whatever the data has."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x):
        return self.head(self.conv(x))
