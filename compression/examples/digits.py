"""The digits example: scikit-learn's bundled 8x8 handwritten digits, upsampled to 16x16, and a small residual CNN."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from edgefleet.compression.examples.blocks import ResidualBlock, scaled
from edgefleet.compression.task import Task

__all__ = ["DigitsNet", "digits_task"]


def digits_task(*, seed: int = 0) -> Task:
    """1797 digits, 80/20 stratified split; pixels scaled to [0, 1] and repeated 2x2 (16x16, one channel)."""
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    images = images.repeat(2, axis=1).repeat(2, axis=2)[:, None, :, :]
    x_train, x_val, y_train, y_val = train_test_split(
        images, data.target.astype(np.int64), test_size=0.2, random_state=seed, stratify=data.target
    )
    return Task.from_arrays("digits", x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, num_classes=10)


class DigitsNet(nn.Sequential):
    """stem conv -> residual block -> strided conv -> residual block -> global pool -> linear.

    Width 1.0 has about 175k parameters and ~16 M multiply-adds per image (about 0.4 ms in onnxruntime on one thread
    here): enough that latency is compute, not call overhead, which is what compression can change.
    """

    def __init__(self, *, width: float = 1.0, num_classes: int = 10) -> None:
        c1, c2 = scaled(40, width), scaled(80, width)
        super().__init__(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            ResidualBlock(c1),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            ResidualBlock(c2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c2, num_classes),
        )
