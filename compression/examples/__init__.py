"""Shipped example models and the data they train on (nothing is downloaded).

model, task = train_example(Example.DIGITS)          # ~110k parameters, about 99% accuracy
model, task = train_example("vibration", width=0.25, epochs=1)   # tiny, for tests
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn

from edgefleet.compression.examples.digits import DigitsNet, digits_task
from edgefleet.compression.examples.vibration import VibrationNet, vibration_task
from edgefleet.compression.task import Task
from edgefleet.compression.training import fit

__all__ = ["EXAMPLES", "EXAMPLE_RECIPE", "Example", "ExampleSpec", "train_example"]

EXAMPLE_RECIPE = Path(__file__).with_name("full-chain.toml")
"""The shipped recipe: distill -> structured prune -> factorize -> static int8."""


class Example(StrEnum):
    DIGITS = "digits"
    VIBRATION = "vibration"


@dataclass(frozen=True)
class ExampleSpec:
    """How to build one example: its data, its network (by width), and how long to train it."""

    task: Callable[[], Task]
    model: Callable[[float], nn.Module]
    epochs: int
    lr: float


EXAMPLES: dict[Example, ExampleSpec] = {
    Example.DIGITS: ExampleSpec(digits_task, lambda w: DigitsNet(width=w), epochs=12, lr=3e-3),
    Example.VIBRATION: ExampleSpec(vibration_task, lambda w: VibrationNet(width=w), epochs=10, lr=3e-3),
}


def train_example(
    example: Example | str,
    *,
    width: float = 1.0,
    epochs: int | None = None,
    time_budget_s: float = 120.0,
    seed: int = 0,
) -> tuple[nn.Module, Task]:
    """Build and train an example model; deterministic for a given seed (on the same machine and thread count)."""
    spec = EXAMPLES[Example(example)]
    task = spec.task()
    torch.manual_seed(seed)
    model = spec.model(width)
    fit(
        model,
        task,
        epochs=spec.epochs if epochs is None else epochs,
        time_budget_s=time_budget_s,
        lr=spec.lr,
        seed=seed,
    )
    return model.eval(), task
