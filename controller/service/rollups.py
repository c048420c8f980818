"""Telemetry rollups: batches are added up in memory per (device, window, model version) and written in bulk.

The write is one transaction per flush. It starts with an `INSERT ... ON CONFLICT DO UPDATE` that adds the
scalar sums, which takes the write lock (SQLite) or the row locks (PostgreSQL) before anything is read, then
merges the latency bucket counts of those rows. Several controller replicas may therefore flush into the same
rows: the sums stay exact. A flush that fails keeps its data in memory and is retried on the next flush.

Example::

    agg = RollupAggregator(window_s=60)
    agg.add("pi-001", "rpi4", batch)
    agg.flush(db)   # -> number of rows written
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import operator
import threading
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.tables import Device, TelemetryRollup, utcnow
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, TelemetryBatch

__all__ = ["RollupAggregator"]

_NBUCKETS = len(LATENCY_BUCKETS_SECONDS) + 1
_SCALARS = ("messages", "inferences", "errors", "labelled", "correct", "confidence_sum", "latency_sum_s")


@dataclasses.dataclass(slots=True)
class _Acc:
    class_name: str
    messages: int = 0
    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    confidence_sum: float = 0.0
    latency_sum_s: float = 0.0
    latency_counts: list[int] = dataclasses.field(default_factory=lambda: [0] * _NBUCKETS)

    def merge(self, other: _Acc) -> None:
        for name in _SCALARS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_counts = [a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)]


_Key = tuple[str, dt.datetime, int]


@dataclasses.dataclass(slots=True)
class _DeviceSeen:
    at: dt.datetime
    model_version: int | None
    model_digest: str | None


class RollupAggregator:
    """Thread-safe in-memory sums; `flush` swaps them out and writes them in one transaction."""

    def __init__(
        self,
        *,
        window_s: int = 60,
        retention: dt.timedelta = dt.timedelta(days=7),
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.window_s = window_s
        self.retention = retention
        self.clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[_Key, _Acc] = {}
        self._seen: dict[str, _DeviceSeen] = {}
        self.pending_messages = 0
        self.recorded_messages = 0
        self._last_prune: dt.datetime | None = None
        self._windows: dict[dt.datetime, dt.datetime] = {}

    def _window(self, when: dt.datetime) -> dt.datetime:
        # Batches of one agent window share their start time: remember the last few answers.
        window = self._windows.get(when)
        if window is None:
            epoch = int(when.timestamp())
            window = dt.datetime.fromtimestamp(epoch - epoch % self.window_s, dt.UTC)
            if len(self._windows) > 4096:
                self._windows.clear()
            self._windows[when] = window
        return window

    def add(self, device_id: str, class_name: str, batch: TelemetryBatch, *, received_at: dt.datetime) -> None:
        key = (device_id, self._window(batch.window_start), batch.model_version or 0)
        with self._lock:
            acc = self._pending.get(key)
            if acc is None:
                acc = self._pending[key] = _Acc(class_name)
            acc.messages += 1
            acc.inferences += batch.inference_count
            if batch.errors:
                acc.errors += sum(batch.errors.values())
            acc.labelled += batch.labelled_count
            acc.correct += batch.correct_count
            if batch.mean_top1_confidence is not None:
                acc.confidence_sum += batch.mean_top1_confidence * batch.inference_count
            acc.latency_sum_s += batch.latency_sum_seconds
            acc.latency_counts = list(map(operator.add, acc.latency_counts, batch.latency_counts))
            self._seen[device_id] = _DeviceSeen(received_at, batch.model_version, batch.model_digest)
            self.pending_messages += 1

    def _take(self) -> tuple[dict[_Key, _Acc], dict[str, _DeviceSeen], int]:
        with self._lock:
            taken = self._pending, self._seen, self.pending_messages
            self._pending, self._seen, self.pending_messages = {}, {}, 0
        return taken

    def _put_back(self, pending: dict[_Key, _Acc], seen: dict[str, _DeviceSeen], count: int) -> None:
        with self._lock:
            for key, acc in pending.items():
                mine = self._pending.get(key)
                if mine is None:
                    self._pending[key] = acc
                else:
                    mine.merge(acc)
            for device_id, s in seen.items():
                self._seen.setdefault(device_id, s)
            self.pending_messages += count

    def flush(self, db: Database) -> int:
        """Write what is pending; returns the number of messages recorded. Raises RegistryError on failure."""
        with self._flush_lock:
            pending, seen, count = self._take()
            if not pending:
                return 0
            try:
                self._write(db, pending, seen)
            except BaseException:
                self._put_back(pending, seen, count)
                raise
            self.recorded_messages += count
            return count

    def _write(self, db: Database, pending: dict[_Key, _Acc], seen: dict[str, _DeviceSeen]) -> None:
        rows = [
            {
                "device_id": device_id,
                "class_name": acc.class_name,
                "model_version": version,
                "window_start": window,
                "window_seconds": self.window_s,
                **{name: getattr(acc, name) for name in _SCALARS},
                "latency_counts_json": "[]",
            }
            for (device_id, window, version), acc in pending.items()
        ]
        with db.transaction("recording telemetry rollups") as session:
            insert = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
            stmt = insert(TelemetryRollup)
            stmt = stmt.on_conflict_do_update(
                index_elements=["device_id", "window_start", "model_version"],
                set_={name: getattr(TelemetryRollup, name) + getattr(stmt.excluded, name) for name in _SCALARS},
            )
            session.execute(stmt, rows)
            self._merge_latency(session, pending)
            self._touch_devices(session, seen)
            self._prune(session)

    def _merge_latency(self, session: sa.orm.Session, pending: dict[_Key, _Acc]) -> None:
        table = TelemetryRollup.__table__  # type: ignore[attr-defined]
        devices = sorted({k[0] for k in pending})
        windows = sorted({k[1] for k in pending})
        found = session.execute(
            sa.select(
                table.c.id, table.c.device_id, table.c.window_start, table.c.model_version, table.c.latency_counts_json
            ).where(table.c.device_id.in_(devices), table.c.window_start.in_(windows))
        ).all()
        updates = []
        for row_id, device_id, window, version, stored in found:
            acc = pending.get((device_id, window, version))
            if acc is None:
                continue
            old = json.loads(stored) if stored and stored != "[]" else [0] * _NBUCKETS
            merged = [a + b for a, b in zip(old, acc.latency_counts, strict=True)]
            updates.append({"rid": row_id, "counts": json.dumps(merged)})
        if updates:
            session.execute(
                sa.update(table)
                .where(table.c.id == sa.bindparam("rid"))
                .values(latency_counts_json=sa.bindparam("counts")),
                updates,
            )

    @staticmethod
    def _touch_devices(session: sa.orm.Session, seen: dict[str, _DeviceSeen]) -> None:
        table = Device.__table__  # type: ignore[attr-defined]
        params = [{"did": d, "at": s.at} for d, s in seen.items()]
        session.execute(
            sa.update(table)
            .where(table.c.id == sa.bindparam("did"))
            .values(last_telemetry_at=sa.bindparam("at"), last_seen=sa.bindparam("at")),
            params,
        )

    def _prune(self, session: sa.orm.Session) -> None:
        now = self.clock()
        if self._last_prune is not None and now - self._last_prune < dt.timedelta(minutes=10):
            return
        self._last_prune = now
        session.execute(sa.delete(TelemetryRollup).where(col(TelemetryRollup.window_start) < now - self.retention))
