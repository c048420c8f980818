"""Models that come as torch code (a shipped example, or a factory plus data) become ONNX files here.

The compression engine (and with it torch) is imported inside the functions only, so `edgefleet --help` and
the rest of the controller never load torch. Where the engine is missing or broken the error says so.

Example::

    onnx_bytes, source = example_onnx("digits")            # trains the shipped example, exports it
    onnx_bytes, source = torch_onnx("pkg.models:make", Path("data.npz"))
    npz_bytes, count = held_out_npz(example="digits")     # held-out `x`, `y` for `simulate --dataset`
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from edgefleet.controller.errors import ControllerError, UnavailableError

__all__ = ["example_onnx", "held_out_npz", "torch_onnx"]


def _engine() -> tuple[Any, Any]:
    try:
        from edgefleet.compression import examples, export
    except ImportError as exc:
        raise UnavailableError(
            f"the compression engine is not available ({exc}); install edgefleet[controller] or add an ONNX file "
            "with --onnx"
        ) from exc
    return examples, export


def _check_example(examples: Any, name: str) -> None:
    known = [e.value for e in examples.Example]
    if name not in known:
        raise ControllerError(f"no shipped example {name!r}: choose one of {', '.join(known)}")


def _compression_error() -> type[Exception]:
    from edgefleet.compression.errors import CompressionError

    return CompressionError


def example_onnx(name: str, *, width: float = 1.0, epochs: int | None = None) -> tuple[bytes, str]:
    """Train a shipped example model and export it; returns the ONNX bytes and a source description."""
    examples, export = _engine()
    _check_example(examples, name)
    try:
        model, task = examples.train_example(name, width=width, epochs=epochs)
        data: bytes = export.export_onnx(model, task.x_val[:1])
    except _compression_error() as exc:
        raise ControllerError(f"example {name}: {exc}") from exc
    return data, f"example:{name}"


def torch_onnx(factory: str, data_path: Path) -> tuple[bytes, str]:
    """Build the model from `module:function`, take a sample input from the `.npz` data, export to ONNX."""
    _, export = _engine()
    from edgefleet.compression import load_factory, load_npz

    try:
        task = load_npz(data_path)
        model = load_factory(factory)
        data: bytes = export.export_onnx(model, task.x_val[:1])
    except _compression_error() as exc:
        raise ControllerError(f"torch model {factory}: {exc}") from exc
    return data, f"torch:{factory}"


def held_out_npz(*, example: str | None = None, data: Path | None = None) -> tuple[bytes, int]:
    """The held-out split (`x_val`, `y_val`) of an example's or an `.npz`'s data as an `.npz` of `x` and `y`.

    That is what `edgefleet-agent simulate --dataset` replays: labelled inputs, so the accuracy gate has samples.
    Returns the file's bytes and the number of samples.
    """
    import numpy as np

    examples, _ = _engine()
    from edgefleet.compression import load_npz

    try:
        if example is not None:
            _check_example(examples, example)
            task = examples.EXAMPLES[examples.Example(example)].task()
        elif data is not None:
            task = load_npz(data)
        else:
            raise ControllerError("give --example NAME or --data FILE.npz")
    except _compression_error() as exc:
        raise ControllerError(str(exc)) from exc
    buffer = io.BytesIO()
    np.savez(buffer, x=task.x_val, y=task.y_val)
    return buffer.getvalue(), len(task.y_val)
