"""Replaying an `.npz` dataset through an agent at a fixed rate: the input source of simulations and soak tests.

The file holds the inputs under `x` (or `inputs`, or the first array) and, optionally, integer labels under `y`
(or `labels`), one per row. Each tick runs one row (batch of 1) and counts it in telemetry with its label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.agent.errors import AgentError

__all__ = ["Dataset", "load_dataset"]


@dataclass(frozen=True, slots=True)
class Dataset:
    inputs: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def sample(self, index: int) -> tuple[np.ndarray, int | None]:
        i = index % len(self)
        label = None if self.labels is None else int(self.labels[i])
        return self.inputs[i : i + 1], label


def load_dataset(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            x_name = next((n for n in ("x", "inputs", "X") if n in names), names[0] if names else None)
            if x_name is None:
                raise AgentError(f"{path} holds no arrays; save inputs as `x` and labels as `y`")
            inputs = np.asarray(data[x_name])
            y_name = next((n for n in ("y", "labels", "Y") if n in names), None)
            labels = np.asarray(data[y_name]).astype(np.int64) if y_name else None
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read dataset {path}: {exc}") from exc
    if inputs.ndim < 2 or len(inputs) == 0:
        raise AgentError(f"{path}: inputs `{x_name}` must be a non-empty array of rows, got shape {inputs.shape}")
    if inputs.dtype == np.float64:
        inputs = inputs.astype(np.float32)
    if labels is not None and labels.shape[0] != inputs.shape[0]:
        raise AgentError(f"{path}: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
    return Dataset(inputs, labels)
