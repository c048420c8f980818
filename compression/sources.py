"""Bring your own model: an `nn.Module` factory ("package.module:callable"), a torch.export program, or an ONNX file.

Every loader raises `ModelLoadError` naming the file or the factory and what went wrong; nothing here trains.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from edgefleet.compression.errors import ModelLoadError
from edgefleet.compression.export import check_onnx

__all__ = ["load_exported_program", "load_factory", "load_onnx", "write_atomic"]

MAX_ONNX_BYTES = 2 * 1024**3


def load_factory(spec: str) -> nn.Module:
    """Call `package.module:callable` (no arguments) and return the `nn.Module` it builds (with its trained weights)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"model factory {spec!r} is not of the form 'package.module:callable'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"model factory {spec!r} cannot be imported: {exc}") from exc
    try:
        model = factory()
    except Exception as exc:
        raise ModelLoadError(f"model factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_exported_program(path: Path | str) -> nn.Module:
    """Load a `torch.export.save`d program as a module (passes that need the module tree may not apply to it)."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a loadable torch.export program ({exc})") from exc
    return ExportedModule(program.module())


class ExportedModule(nn.Module):
    """A torch.export program as an ordinary module.

    The program's own module refuses `.train()`/`.eval()`; the graph was frozen in whichever mode it was exported in
    (usually eval), so here switching modes only sets the flag. Fine-tuning then updates its weights in that mode.
    """

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.graph(x)
        return out


def load_onnx(path: Path | str) -> bytes:
    """Read and check an ONNX file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_ONNX_BYTES:
            raise ModelLoadError(f"{path}: larger than {MAX_ONNX_BYTES} bytes; external-data models are not supported")
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        check_onnx(data)
    except Exception as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    return data


def write_atomic(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
