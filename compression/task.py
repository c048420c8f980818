"""Tasks: the data a model is trained, calibrated and judged on, checked once when it is built.

A `Task` holds float32 inputs and int64 class labels for training and held-out validation. Everything downstream
(training, calibration, accuracy, latency inputs) reads from it, so every data check lives here.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.compression.errors import DataError

__all__ = ["Task", "load_npz"]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
NPZ_KEYS = ("x_train", "y_train", "x_val", "y_val")


def _as_inputs(name: str, array: npt.NDArray[np.generic]) -> FloatArray:
    if array.dtype.kind not in "fiu":
        raise DataError(f"{name}: dtype {array.dtype} is not numeric; give float32 inputs")
    if array.ndim < 2:
        raise DataError(f"{name}: shape {array.shape} has no sample axis; expected (samples, features...)")
    if array.shape[0] == 0:
        raise DataError(f"{name}: the dataset is empty (0 samples)")
    out = np.ascontiguousarray(array, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise DataError(f"{name}: {int(bad.sum())} NaN or infinite values (first in sample {first}); clean the data")
    return out


def _as_labels(name: str, array: npt.NDArray[np.generic], samples: int) -> IntArray:
    if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and np.all(np.mod(array, 1) == 0)):
        raise DataError(f"{name}: dtype {array.dtype} is not integer class labels")
    if array.ndim != 1:
        raise DataError(f"{name}: shape {array.shape}; expected one label per sample, shape ({samples},)")
    if array.shape[0] != samples:
        raise DataError(f"{name}: {array.shape[0]} labels for {samples} samples")
    if array.size and array.min() < 0:
        raise DataError(f"{name}: negative class label {int(array.min())}")
    return np.ascontiguousarray(array, dtype=np.int64)


@dataclass(frozen=True)
class Task:
    """Classification data: `x_*` float32 (samples, *input_shape), `y_*` int64 labels in [0, num_classes)."""

    name: str
    x_train: FloatArray
    y_train: IntArray
    x_val: FloatArray
    y_val: IntArray
    num_classes: int = field(default=0)

    @classmethod
    def from_arrays(
        cls,
        name: str,
        *,
        x_train: npt.NDArray[np.generic],
        y_train: npt.NDArray[np.generic],
        x_val: npt.NDArray[np.generic],
        y_val: npt.NDArray[np.generic],
        num_classes: int | None = None,
    ) -> Task:
        """Check and convert the arrays; raises `DataError` naming the array and what is wrong."""
        xt, xv = _as_inputs("x_train", x_train), _as_inputs("x_val", x_val)
        if xt.shape[1:] != xv.shape[1:]:
            raise DataError(f"x_val: sample shape {xv.shape[1:]} differs from x_train's {xt.shape[1:]}")
        yt, yv = _as_labels("y_train", y_train, xt.shape[0]), _as_labels("y_val", y_val, xv.shape[0])
        seen = int(max(yt.max(), yv.max())) + 1
        classes = seen if num_classes is None else num_classes
        if classes < 2:
            raise DataError(f"{name}: labels have {classes} class; classification needs at least 2")
        if seen > classes:
            raise DataError(f"{name}: label {seen - 1} is out of range for {classes} classes")
        return cls(name=name, x_train=xt, y_train=yt, x_val=xv, y_val=yv, num_classes=classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample, without the batch axis."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def calibration(self, samples: int, *, seed: int = 0) -> FloatArray:
        """A deterministic sample of training inputs for calibration (activation ranges, activation statistics)."""
        count = min(samples, self.x_train.shape[0])
        order = np.random.default_rng(seed).permutation(self.x_train.shape[0])[:count]
        return self.x_train[np.sort(order)]

    def check_input(self, shape: tuple[int, ...], *, source: str) -> None:
        """Raise `DataError` if a model's input shape (without batch) does not match the data."""
        if tuple(shape) != self.input_shape:
            raise DataError(
                f"{source} expects inputs of shape {shape}, the data has samples of shape {self.input_shape}"
            )


def load_npz(path: Path | str, *, name: str | None = None) -> Task:
    """Read `x_train, y_train, x_val, y_val` from a .npz file (no pickles) into a checked `Task`."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (numpy.savez writes one: a zip of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)}; expected {', '.join(NPZ_KEYS)}")
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read as .npz ({exc})") from exc
    try:
        return Task.from_arrays(name or path.stem, **arrays)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
