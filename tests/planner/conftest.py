"""Fixtures of the planner tests: a tiny trained model (helpers in plankit.py; this folder goes on sys.path)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plankit import Tiny

from edgefleet.compression import Task
from edgefleet.compression.export import export_onnx
from edgefleet.compression.training import fit


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a 2-core machine shared with other jobs, 2 spinning threads train ~15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    """An MLP on the raw 8x8 digits (64 features): trains in about a second, about 95% accurate on 400 samples."""
    torch.manual_seed(0)
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    task = Task.from_arrays("tiny-digits", x_train=x[:1000], y_train=y[:1000], x_val=x[1000:1400], y_val=y[1000:1400])
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures start before the module's one-thread fixture
    fit(model, task, epochs=15, time_budget_s=30, lr=3e-3)
    torch.set_num_threads(threads)
    model.eval()
    return Tiny(model, task, export_onnx(model, task.x_val))
