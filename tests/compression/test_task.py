"""Data is checked once, when a Task is built: every bad input gets one error naming the array and the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.compression import DataError, Task, load_npz

GOOD = {
    "x_train": np.zeros((8, 1, 4), np.float32),
    "y_train": np.array([0, 1] * 4),
    "x_val": np.zeros((4, 1, 4), np.float32),
    "y_val": np.array([0, 1, 0, 1]),
}


def _with(**changes: object) -> dict[str, object]:
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (_with(x_train=np.full((8, 1, 4), np.nan, np.float32)), "x_train: 32 NaN or infinite"),
        (_with(x_val=np.zeros((0, 1, 4), np.float32), y_val=np.zeros(0, np.int64)), "x_val: the dataset is empty"),
        (_with(x_val=np.zeros((4, 1, 5), np.float32)), r"sample shape \(1, 5\) differs"),
        (_with(y_train=np.zeros((8, 2), np.int64)), "one label per sample"),
        (_with(y_train=np.zeros(7, np.int64)), "7 labels for 8 samples"),
        (_with(x_train=np.array([["a"]] * 8)), "not numeric"),
        (_with(y_val=np.array([0.5, 1, 0, 1])), "not integer class labels"),
        (_with(y_train=np.array([0, -1] * 4)), "negative class label"),
        (_with(x_train=np.zeros(8, np.float32)), "no sample axis"),
    ],
)
def test_bad_arrays(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(DataError, match=message):
        Task.from_arrays("t", **arrays)


def test_labels_out_of_range() -> None:
    with pytest.raises(DataError, match="out of range for 2 classes"):
        Task.from_arrays("t", **_with(y_val=np.array([0, 1, 2, 1])), num_classes=2)


def test_npz_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, **GOOD)
    task = load_npz(path)
    assert task.input_shape == (1, 4)
    assert task.num_classes == 2
    missing = tmp_path / "missing.npz"
    np.savez(missing, x_train=GOOD["x_train"])
    with pytest.raises(DataError, match="missing arrays y_train, x_val, y_val"):
        load_npz(missing)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not an \.npz file \(numpy\.savez writes one"):
        load_npz(junk)
