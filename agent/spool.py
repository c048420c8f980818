"""A bounded on-disk queue of messages that could not be sent yet (telemetry while offline).

Each item is one file named by a growing sequence number, so the oldest is sent first after a reconnect and a
restart keeps what was queued. When the queue is full the oldest item is dropped and counted: recent windows
matter more to a rollout's health gates than old ones.

Example::

    spool = Spool(data_dir / "outbox", max_items=1000)
    spool.push(payload)
    for seq, payload in spool.peek(10):
        ...  # publish, and on PUBACK:
        spool.remove(seq)
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from edgefleet.agent.errors import StateError
from edgefleet.agent.persist import write_atomic

__all__ = ["Spool"]

log = logging.getLogger(__name__)


class Spool:
    __slots__ = ("_seqs", "directory", "dropped", "durable", "max_items")

    def __init__(self, directory: Path, *, max_items: int = 1000, durable: bool = True) -> None:
        if max_items < 1:
            raise StateError(f"spool {directory}: max_items must be at least 1, got {max_items}")
        self.directory = directory
        self.max_items = max_items
        self.durable = durable
        self.dropped = 0
        self._seqs: list[int] | None = None  # loaded lazily: a simulated fleet has thousands of spools

    def _index(self) -> list[int]:
        if self._seqs is None:
            seqs = []
            if self.directory.is_dir():
                for path in self.directory.glob("*.msg"):
                    with contextlib.suppress(ValueError):
                        seqs.append(int(path.stem))
            self._seqs = sorted(seqs)
        return self._seqs

    def __len__(self) -> int:
        return len(self._index())

    def push(self, payload: bytes) -> int:
        seqs = self._index()
        seq = seqs[-1] + 1 if seqs else 1
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / f"{seq:012d}.msg", payload, durable=self.durable)
        seqs.append(seq)
        while len(seqs) > self.max_items:
            self.remove(seqs[0])
            self.dropped += 1
            log.warning("outbox %s is full (%s items): dropped the oldest", self.directory, self.max_items)
        return seq

    def peek(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` oldest items; unreadable items are dropped with a warning."""
        out: list[tuple[int, bytes]] = []
        for seq in list(self._index()):
            if len(out) >= limit:
                break
            try:
                out.append((seq, (self.directory / f"{seq:012d}.msg").read_bytes()))
            except OSError as exc:
                log.warning("outbox item %s unreadable (%s): dropped", seq, exc)
                self.remove(seq)
        return out

    def remove(self, seq: int) -> None:
        seqs = self._index()
        with contextlib.suppress(ValueError):
            seqs.remove(seq)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{seq:012d}.msg").unlink()
