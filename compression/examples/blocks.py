"""Building blocks shared by the example networks: a residual block that makes pruning need a dependency graph."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualBlock", "scaled"]


def scaled(channels: int, width: float) -> int:
    """Channels after a width multiplier, at least 4 so a tiny test model still learns."""
    return max(4, round(channels * width))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU; 1-D or 2-D. The add ties the channels of both convs."""

    def __init__(self, channels: int, *, dims: int = 2, kernel: int = 3) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.conv1 = conv(channels, channels, kernel, padding=kernel // 2, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = conv(channels, channels, kernel, padding=kernel // 2, bias=False)
        self.bn2 = norm(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        out: torch.Tensor = self.relu(self.bn2(self.conv2(y)) + x)
        return out
