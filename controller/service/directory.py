"""A read-through cache of who each device is (class, fleet) and which class each artifact digest belongs to.

The hot telemetry path must not query the database per message. Known devices stay cached (a device's class
and fleet do not change); unknown ids and digests are cached for a few seconds only, so a device registered
while the controller runs is recognised quickly. Safe to share between threads.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from sqlmodel import select

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.tables import Artifact, Device

__all__ = ["DeviceDirectory", "DeviceInfo"]


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: str
    class_name: str
    fleet: str


class DeviceDirectory:
    def __init__(
        self,
        db: Database,
        *,
        negative_ttl_s: float = 5.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceInfo] = {}
        self._missing: dict[str, float] = {}
        self._digests: dict[str, tuple[frozenset[str], float]] = {}

    def get(self, device_id: str) -> DeviceInfo | None:
        info = self._devices.get(device_id)
        if info is not None:
            return info
        now = self.clock()
        missed = self._missing.get(device_id)
        if missed is not None and now - missed < self.negative_ttl_s:
            return None
        with self.db.reading(f"looking up device {device_id}") as session:
            row = session.get(Device, device_id)
        with self._lock:
            if len(self._missing) > self.max_entries:
                self._missing.clear()
            if row is None:
                self._missing[device_id] = now
                return None
            info = DeviceInfo(row.id, row.class_name, row.fleet)
            self._devices[device_id] = info
            self._missing.pop(device_id, None)
        return info

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._devices.pop(device_id, None)
            self._missing.pop(device_id, None)

    def digest_allowed(self, digest: str, class_name: str) -> bool:
        """False when `digest` is a known artifact of other classes only; unknown digests are allowed."""
        now = self.clock()
        cached = self._digests.get(digest)
        if cached is None or (not cached[0] and now - cached[1] >= self.negative_ttl_s):
            with self.db.reading("looking up an artifact digest") as session:
                classes = frozenset(session.exec(select(Artifact.class_name).where(Artifact.sha256 == digest)).all())
            with self._lock:
                if len(self._digests) > self.max_entries:
                    self._digests.clear()
                self._digests[digest] = (classes, now)
            cached = (classes, now)
        return not cached[0] or class_name in cached[0]
