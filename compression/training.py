"""Bounded training and evaluation of torch classifiers: every loop stops at its epoch count or its time budget."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from edgefleet.compression.errors import DataError, VerificationError
from edgefleet.compression.task import Task

__all__ = ["FitResult", "LossFn", "accuracy", "fit", "predict_logits"]

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(model, inputs, labels, sample indices into x_train) -> scalar loss; the default is cross-entropy on the logits.

The indices let a loss look up per-sample values computed once, such as a teacher's logits."""


@dataclass(frozen=True)
class FitResult:
    epochs: int
    seconds: float
    stopped_by_budget: bool
    final_loss: float


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, _index: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def fit(
    model: nn.Module,
    task: Task,
    *,
    epochs: int,
    time_budget_s: float,
    lr: float = 1e-3,
    batch_size: int = 64,
    loss_fn: LossFn | None = None,
    extra_params: Iterable[nn.Parameter] = (),
    seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> FitResult:
    """Train `model` in place with Adam and a cosine schedule; stop after `epochs` or `time_budget_s` seconds.

    The budget is checked after every batch, so a run overshoots it by at most one batch.
    """
    loss_fn = loss_fn or _cross_entropy
    start = clock()
    if epochs == 0:
        return FitResult(0, 0.0, stopped_by_budget=False, final_loss=math.nan)
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    optimizer = torch.optim.Adam(params, lr=lr)
    x_all, y_all = torch.from_numpy(task.x_train), torch.from_numpy(task.y_train)
    steps_per_epoch = max(1, math.ceil(len(x_all) / batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_value, done, over_budget = math.nan, 0, False
    for _epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, x_all[index], y_all[index], index)
            if not torch.isfinite(loss):
                raise VerificationError(f"training diverged: loss is {loss.item()} (lower the learning rate {lr})")
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
            loss_value = float(loss.item())
            if clock() - start > time_budget_s:
                over_budget = True
                break
        done += 1
        if over_budget:
            break
    model.eval()
    seconds = clock() - start
    log.info("trained %s epochs in %.1f s (loss %.4f, budget hit: %s)", done, seconds, loss_value, over_budget)
    return FitResult(done, seconds, stopped_by_budget=over_budget, final_loss=loss_value)


@torch.no_grad()
def predict_logits(model: nn.Module, x: npt.NDArray[np.float32], *, batch_size: int = 512) -> npt.NDArray[np.float32]:
    """Logits of `model` in eval mode for a batch of inputs."""
    model.eval()
    outs = [model(torch.from_numpy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    if not outs:
        raise DataError("no inputs to predict on (empty dataset)")
    return torch.cat(outs).numpy().astype(np.float32)


def accuracy(model: nn.Module, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    """Top-1 accuracy of a torch model."""
    return float(np.mean(predict_logits(model, x).argmax(axis=1) == y))
