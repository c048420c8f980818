"""Two model slots and an atomic switch between them.

Layout under the agent's data directory::

    slots/a/model.onnx   slots/a/meta.json
    slots/b/model.onnx   slots/b/meta.json
    slots/current -> a   (a symlink, replaced with os.replace: the switch is one atomic rename)

A new model is always written into the slot that is *not* current, so the running model is never touched until
the switch, and the previous model stays for a rollback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent.errors import SlotError
from edgefleet.agent.persist import fsync_dir, read_json, write_json

__all__ = ["SlotInfo", "Slots"]

SLOT_NAMES = ("a", "b")
MODEL_FILE = "model.onnx"
META_FILE = "meta.json"


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """What one slot holds: the model file and what we recorded about it when installing."""

    name: str
    model_path: Path
    meta: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.meta.get("version", 0))

    @property
    def digest(self) -> str:
        return str(self.meta.get("sha256", ""))


class Slots:
    """The two slots of one device. `durable=False` skips fsyncs (simulated devices in one process)."""

    __slots__ = ("durable", "root")

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable

    @property
    def _pointer(self) -> Path:
        return self.root / "current"

    def _ensure(self) -> None:
        for name in SLOT_NAMES:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def current_name(self) -> str | None:
        try:
            target = self._pointer.readlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SlotError(f"{self._pointer} is not a slot pointer ({exc}); remove it to start with no model") from exc
        name = Path(target).name
        return name if name in SLOT_NAMES else None

    def inactive_name(self) -> str:
        current = self.current_name()
        return "b" if current == "a" else "a"

    def info(self, name: str) -> SlotInfo | None:
        """The slot's model and metadata, or None when it holds no complete model."""
        directory = self.root / name
        meta = read_json(directory / META_FILE)
        model = directory / MODEL_FILE
        if not isinstance(meta, dict) or not model.is_file():
            return None
        return SlotInfo(name, model, meta)

    def current(self) -> SlotInfo | None:
        name = self.current_name()
        return self.info(name) if name is not None else None

    def previous(self) -> SlotInfo | None:
        """The model in the inactive slot, when there is one to roll back to."""
        return self.info(self.inactive_name()) if self.current_name() is not None else None

    def install(self, source: Path, meta: dict[str, Any]) -> SlotInfo:
        """Copy `source` into the inactive slot, then write its metadata (last, so a torn install has none)."""
        self._ensure()
        name = self.inactive_name()
        directory = self.root / name
        with contextlib.suppress(FileNotFoundError):
            (directory / META_FILE).unlink()
        tmp = directory / f".{MODEL_FILE}.tmp"
        try:
            shutil.copyfile(source, tmp)
            if self.durable:
                with tmp.open("rb+") as fh:
                    os.fsync(fh.fileno())
            tmp.replace(directory / MODEL_FILE)
        except OSError as exc:
            raise SlotError(f"cannot install {source} into slot {name}: {exc.strerror or exc}") from exc
        write_json(directory / META_FILE, meta, durable=self.durable)
        return SlotInfo(name, directory / MODEL_FILE, meta)

    def activate(self, name: str) -> None:
        """Point `current` at slot `name` with one atomic rename."""
        if self.info(name) is None:
            raise SlotError(f"slot {name} holds no complete model; install one before activating it")
        tmp = self.root / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            tmp.symlink_to(name)
            tmp.replace(self._pointer)
        except OSError as exc:
            raise SlotError(f"cannot switch {self._pointer} to slot {name}: {exc.strerror or exc}") from exc
        if self.durable:
            fsync_dir(self.root)

    def clear(self, name: str) -> None:
        """Forget the model in a slot that is not current (a refused or rolled back install)."""
        if name == self.current_name():
            raise SlotError(f"slot {name} is the running model; switch away from it before clearing it")
        with contextlib.suppress(FileNotFoundError):
            (self.root / name / META_FILE).unlink()
