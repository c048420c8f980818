"""Telemetry windows from inference to the wire: record, close a window, send it QoS 1 or keep it on disk.

While connected a closed window is published at once and held in memory until its PUBACK (paho re-sends
unacknowledged QoS 1 messages after a reconnect). While offline it goes to the bounded on-disk `Spool`, which is
drained oldest first after the next connect, so nothing is lost across a disconnect of reasonable length.
`record` may be called from any thread; everything else runs on the reactor.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from edgefleet.agent.spool import Spool
from edgefleet.agent.window import Window
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, ErrorKind, TelemetryBatch

__all__ = ["ModelTag", "TelemetryReporter", "rss_bytes"]

log = logging.getLogger(__name__)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as fh:  # noqa: PTH123 - hot path, no Path object per call
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class ModelTag:
    name: str
    digest: str
    version: int


class _Link(Protocol):
    @property
    def connected(self) -> bool: ...


class TelemetryReporter:
    """One device's telemetry: `publish(payload) -> mid` sends QoS 1; `on_publish(mid)` is its PUBACK.

    The window and the outbox are built on first use: most simulated devices never infer or go offline.
    """

    __slots__ = ("_inflight", "_link", "_lock", "_new_spool", "_publish", "_spool", "_started", "_window",
                 "acked", "sent", "seq", "session")  # fmt: skip

    def __init__(
        self,
        new_spool: Callable[[], Spool],
        *,
        publish: Callable[[bytes], int],
        link: _Link,
        session: str,
        started: datetime,
        lock: threading.Lock | None = None,
    ) -> None:
        self._new_spool = new_spool
        self._spool: Spool | None = None
        self._publish = publish
        self._link = link
        self.session = session
        self.seq = 0
        self._lock = lock or threading.Lock()
        self._started = started.timestamp()
        self._window: Window | None = None
        self._inflight: dict[int, bytes] | None = None
        self.sent = 0
        self.acked = 0

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            self._spool = self._new_spool()
        return self._spool

    def _current(self) -> Window:
        if self._window is None:
            self._window = Window(buckets=LATENCY_BUCKETS_SECONDS, started=self._started)
        return self._window

    def record(self, *, latency_s: float, confidence: float, correct: bool | None) -> None:
        with self._lock:
            self._current().record(latency_s=latency_s, confidence=confidence, correct=correct)

    def record_error(self, kind: ErrorKind) -> None:
        with self._lock:
            self._current().record_error(kind.value)

    def window_empty(self) -> bool:
        """True while the current window has counted nothing (no inference, no error)."""
        with self._lock:
            window = self._window
            return window is None or window.empty

    def close_window(self, now: datetime, *, model: ModelTag | None, rss: int | None) -> TelemetryBatch:
        """Close the current window, send it (or queue it on disk) and start the next one."""
        with self._lock:
            window = self._current()
            self._window, self._started = None, now.timestamp()
        snap = window.close(ended=now.timestamp())
        mean = snap.mean_confidence
        batch = TelemetryBatch(
            session=self.session,
            seq=self.seq,
            window_start=datetime.fromtimestamp(snap.started, UTC),
            window_end=datetime.fromtimestamp(max(snap.started, snap.ended), UTC),
            model_name=model.name if model else None,
            model_digest=model.digest if model else None,
            model_version=model.version if model else None,
            inference_count=snap.inferences,
            latency_counts=snap.bucket_counts,
            latency_sum_seconds=snap.latency_sum_s,
            labelled_count=snap.labelled,
            correct_count=snap.correct,
            mean_top1_confidence=None if mean is None else min(1.0, max(0.0, mean)),
            errors={ErrorKind(k): v for k, v in snap.errors.items()},
            rss_bytes=rss,
        )
        self.seq += 1
        payload = batch.model_dump_json(by_alias=True).encode()
        if self._link.connected and (self._spool is None or len(self._spool) == 0):
            self._send(payload)
        else:
            self.spool.push(payload)
            self.drain()
        return batch

    def _send(self, payload: bytes) -> None:
        mid = self._publish(payload)
        if self._inflight is None:
            self._inflight = {}
        self._inflight[mid] = payload
        self.sent += 1

    def drain(self, *, limit: int = 50) -> None:
        """Send queued windows, oldest first, while connected (called after connect and after each PUBACK)."""
        if not self._link.connected or self._spool is None:
            return
        budget = limit - len(self._inflight or ())
        for seq, payload in self.spool.peek(max(0, budget)):
            self._send(payload)
            self.spool.remove(seq)

    def on_publish(self, mid: int) -> bool:
        """PUBACK for `mid`; True when it was a telemetry window."""
        if not self._inflight or self._inflight.pop(mid, None) is None:
            return False
        self.acked += 1
        if self._spool is not None and len(self._spool):
            self.drain()
        return True

    @property
    def unacknowledged(self) -> int:
        return len(self._inflight or ()) + (len(self._spool) if self._spool is not None else 0)
