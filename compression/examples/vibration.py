"""The vibration example: generated accelerometer signals of a rotating machine, five fault classes, and a 1-D CNN.

Stands for predictive maintenance on industrial sensors. Each signal is 512 samples at 2 kHz of a shaft turning at
20-40 Hz (random per signal), with random phases and Gaussian noise. The classes differ in harmonic signature:

- 0 healthy: a modest 1x component and a small 2x;
- 1 imbalance: a strong 1x component;
- 2 misalignment: strong 2x and 3x components;
- 3 bearing fault: bursts of a ~400 Hz resonance repeating at 3.6x the shaft speed (outer-race defect frequency);
- 4 mechanical looseness: many harmonics (1x-8x) and half-harmonics.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from torch import nn

from edgefleet.compression.examples.blocks import ResidualBlock, scaled
from edgefleet.compression.task import Task

__all__ = ["CLASSES", "VibrationNet", "make_signals", "vibration_task"]

CLASSES = ("healthy", "imbalance", "misalignment", "bearing", "looseness")
LENGTH, RATE = 512, 2000.0


def _signal(label: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    t = np.arange(LENGTH) / RATE
    f0 = rng.uniform(20.0, 40.0)

    def tone(mult: float, amp: float) -> npt.NDArray[np.float64]:
        return amp * np.sin(2 * np.pi * mult * f0 * t + rng.uniform(0, 2 * np.pi))

    x = tone(1, 1.0) + tone(2, 0.2)
    if label == 1:
        x += tone(1, 2.0)
    elif label == 2:
        x += tone(2, 1.2) + tone(3, 0.8)
    elif label == 3:
        period = 1.0 / (3.6 * f0)
        phase = (t + rng.uniform(0, period)) % period
        x += 1.5 * np.exp(-phase / 0.002) * np.sin(2 * np.pi * rng.uniform(380, 420) * t)
    elif label == 4:
        for mult in (0.5, 1.5, 2.5, 3, 4, 5, 6, 7, 8):
            x += tone(mult, rng.uniform(0.2, 0.5))
    return x + rng.normal(0.0, 0.6, LENGTH)


def make_signals(per_class: int, *, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """`per_class` signals of each class, shuffled, shape (n, 1, 512); deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    rng.shuffle(labels)
    x = np.stack([_signal(int(label), rng) for label in labels]).astype(np.float32)[:, None, :]
    return x, labels.astype(np.int64)


def vibration_task(*, seed: int = 0, per_class: int = 300) -> Task:
    x_train, y_train = make_signals(per_class, seed=seed)
    x_val, y_val = make_signals(max(1, per_class // 3), seed=seed + 1)
    return Task.from_arrays(
        "vibration", x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, num_classes=len(CLASSES)
    )


class VibrationNet(nn.Sequential):
    """strided conv -> strided conv -> residual block -> strided conv -> global pool -> linear (1-D)."""

    def __init__(self, *, width: float = 1.0, num_classes: int = len(CLASSES)) -> None:
        c1, c2, c3 = scaled(16, width), scaled(32, width), scaled(64, width)
        super().__init__(
            nn.Conv1d(1, c1, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm1d(c1),
            nn.ReLU(),
            nn.Conv1d(c1, c2, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm1d(c2),
            nn.ReLU(),
            ResidualBlock(c2, dims=1),
            nn.Conv1d(c2, c3, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(c3),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(c3, num_classes),
        )
