"""Crash-safe file writes: temp file, fsync, os.replace, fsync of the directory.

A power cut at any point leaves either the old content or the new one, never a torn file.

Example::

    write_atomic(data_dir / "state.json", json.dumps(state).encode())
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from edgefleet.agent.errors import StateError

__all__ = ["fsync_dir", "read_json", "write_atomic", "write_json"]


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically; `durable=False` skips the fsyncs (simulated devices)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateError(f"cannot write {path}: {exc.strerror or exc}; check free space and permissions") from exc
    if durable:
        fsync_dir(path.parent)


def write_json(path: Path, value: Any, *, durable: bool = True) -> None:
    """`write_atomic` of a compact JSON document."""
    write_atomic(path, json.dumps(value, separators=(",", ":"), sort_keys=True).encode(), durable=durable)


def read_json(path: Path) -> Any | None:
    """The JSON document at `path`, or None when it does not exist. A corrupt file raises `StateError`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON ({exc}); delete it to start from idle") from exc
