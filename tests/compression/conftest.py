"""Tiny trained example models, built once per test session (a few seconds in all)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from edgefleet.compression import Task
from edgefleet.compression.examples.digits import DigitsNet, digits_task
from edgefleet.compression.examples.vibration import VibrationNet, vibration_task
from edgefleet.compression.training import fit


@dataclass(frozen=True)
class Trained:
    model: nn.Module
    task: Task


def _subset(task: Task, n_train: int, n_val: int) -> Task:
    return Task.from_arrays(
        task.name,
        x_train=task.x_train[:n_train],
        y_train=task.y_train[:n_train],
        x_val=task.x_val[:n_val],
        y_val=task.y_val[:n_val],
        num_classes=task.num_classes,
    )


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on 2 cores shared with other jobs, two spinning OpenMP threads run far slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> Trained:
    """A quarter-width digits CNN (residual blocks, BatchNorm) trained 4 epochs on 600 images (about 90% accurate)."""
    torch.manual_seed(0)
    task = _subset(digits_task(), 600, 200)
    model = DigitsNet(width=0.25)
    fit(model, task, epochs=4, time_budget_s=30, lr=1e-2, batch_size=32)
    return Trained(model.eval(), task)


@pytest.fixture(scope="session")
def vibration() -> Trained:
    torch.manual_seed(0)
    task = vibration_task(per_class=60)
    model = VibrationNet(width=0.5)
    fit(model, task, epochs=4, time_budget_s=30, lr=1e-2, batch_size=32)
    return Trained(model.eval(), task)


@pytest.fixture(scope="session")
def mlp() -> Trained:
    """A Linear-heavy model on flattened digits, for SVD and dynamic int8."""
    torch.manual_seed(0)
    base = _subset(digits_task(), 600, 200)
    flat = Task.from_arrays(
        "digits-flat",
        x_train=base.x_train.reshape(len(base.x_train), -1),
        y_train=base.y_train,
        x_val=base.x_val.reshape(len(base.x_val), -1),
        y_val=base.y_val,
        num_classes=10,
    )
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    fit(model, flat, epochs=3, time_budget_s=30, lr=3e-3)
    return Trained(model.eval(), flat)
