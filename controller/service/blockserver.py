"""The controller's block server: answers devices' block requests, one broadcast per block for all of them.

Devices ask on their own `.../blocks/req` topic for the blocks they miss (a bitmap). Requests for the same
artifact are merged into one *wanted* set per artifact; sending starts once no request has added a block for
`coalesce_s` (at most `coalesce_max_s` after the first), and each wanted block is published once on the
shared `artifact_blocks_topic(fleet, sha256)`, which every device fetching that artifact subscribes to: N devices
starting together cost about one artifact of output, not N.
A device that joins mid-stream adds the blocks it missed; the cursor wraps round to send them after the rest.
The server remembers when it first heard from each device for each artifact (`listening since`): a block sent
after that, and asked for again by the same device within `resend_holdoff_s`, is not sent again yet (it is most
likely still on its way, or queued behind the others on a busy device); the device asks again after its own,
growing timeout if it really lost it. A block sent *before* the device was listening is sent again at once, holdoff
or not: the device cannot have had it (it subscribes to the shared topic just before its first request).

Output is bounded twice: a token bucket (`rate_limit_bytes_per_s`) and an in-flight window (`max_inflight`
blocks handed to the MQTT client and not yet reported by `on_published`: for QoS 1, not yet acknowledged by
the broker), so a big rollout never queues an unbounded backlog in the client, and never more than `max_inflight`
(at most 65,535, paho's QoS 1 message ids) are unacknowledged. `publish` returns the message id to count, or None
for a message that will not be reported (not counted).

With `qos=1` and `ack_every=K > 1`, only every K-th block (and the last one before the queue runs dry) goes with
QoS 1, the others with QoS 0 and untracked: the broker handles one connection's packets in order, so the
acknowledgement of such a marker covers the blocks sent before it, and the window still counts every block not yet
covered by an acknowledged marker. It spares the controller most of the acknowledgements (a Python callback each
in paho) at the price of a coarser window.

Wiring into the controller's `MqttClient` (see `edgefleet.controller.service.app.BlockServing`)::

    def publish(topic: str, payload: bytes, qos: int) -> int | None:
        if server.tracks(qos):  # counted in the window: report back when the broker acknowledges it
            return client.publish_tracked(topic, payload, qos=qos, on_done=server.on_published)
        client.publish(topic, payload, qos=qos, timeout=None)  # covered by the next marker
        return None

    server = BlockServer(
        publish,
        artifact_path=store.path_for_sha256,          # sha256 -> Path | ServedArtifact | None
        rate_limit_bytes_per_s=20e6,
        max_inflight=64,
        qos=1,
        ack_every=8,
    )
    # for each message on a BLOCK_REQUEST topic (controller_filters(fleet) subscribes to them):
    server.handle_request(topic, payload)
    server.start()     # a daemon thread that sends; server.stop() on shutdown

On a selector loop instead of a thread, call `pump()` when `on_ready` (given to the constructor) says there is
new work (a request added blocks, or a full window got room) and again after the wait `pump()` returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.protocols.blocks import BlockRequest, encode_block
from edgefleet.protocols.codec import decode
from edgefleet.protocols.errors import ProtocolError
from edgefleet.protocols.manifest import block_count
from edgefleet.protocols.topics import TopicKind, artifact_blocks_topic, parse_topic
from edgefleet.protocols.wire import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

__all__ = ["BlockServer", "BlockServerStats", "ServedArtifact"]

log = logging.getLogger(__name__)

IDLE_STREAM_S = 60.0
MAX_WINDOW = 65535  # paho's QoS 1 message ids
MAX_LISTENERS = 100_000  # per artifact stream; beyond, forgotten (each device then counts as new: more resends)
EARLY_KEEP_S = 30.0  # how long a report that came before its publish returned is kept for it


@dataclass(frozen=True, slots=True)
class ServedArtifact:
    """An artifact file and the block size its manifest was cut with."""

    path: Path
    block_size: int


@dataclass(slots=True)
class BlockServerStats:
    requests: int = 0
    bad_requests: int = 0
    unknown_artifacts: int = 0
    blocks_sent: int = 0
    bytes_sent: int = 0  # header included: what went to the broker
    payload_bytes_sent: int = 0
    held_back: int = 0  # block asks not acted on: already queued, or sent to that device within the holdoff
    late_resends: int = 0  # block asks from a device that joined after the block was sent (sent again at once)
    max_inflight_seen: int = 0  # the most blocks ever unacknowledged at once


@dataclass(slots=True)
class _Stream:
    fleet: str
    sha256: str
    path: Path
    size: int
    block_size: int
    count: int
    topic: str
    fd: int
    wanted: bytearray = field(default_factory=bytearray)
    sent_at: list[float] = field(default_factory=list)
    pending: int = 0
    cursor: int = 0
    ready_at: float = 0.0
    first_wait: float = 0.0
    sending: bool = False
    last_active: float = 0.0
    listening: dict[str, float] = field(default_factory=dict)  # device -> when its first request came

    def listening_since(self, device: str, now: float) -> float:
        since = self.listening.get(device)
        if since is None:
            if len(self.listening) >= MAX_LISTENERS:
                self.listening.clear()
            since = self.listening[device] = now
        return since

    def want(self, index: int, *, now: float, holdoff: float, since: float, stats: BlockServerStats) -> bool:
        if self.wanted[index >> 3] & (1 << (index & 7)):
            stats.held_back += 1
            return False  # already queued: one send serves every device that asked
        sent = self.sent_at[index]
        if now - sent < holdoff:
            if sent >= since:
                stats.held_back += 1
                return False  # sent while this device listened: most likely still on its way to it
            stats.late_resends += 1
        self.wanted[index >> 3] |= 1 << (index & 7)
        self.pending += 1
        return True

    def take_next(self, now: float) -> int | None:
        for step in range(self.count):
            index = (self.cursor + step) % self.count
            if self.wanted[index >> 3] & (1 << (index & 7)):
                self.wanted[index >> 3] &= ~(1 << (index & 7)) & 0xFF
                self.pending -= 1
                self.sent_at[index] = now
                self.cursor = (index + 1) % self.count
                return index
        return None


def _infer_block_size(size: int, count: int) -> int | None:
    """The power-of-two block size in 4..128 KiB that cuts `size` bytes into `count` blocks."""
    bs = MIN_BLOCK_SIZE
    while bs <= MAX_BLOCK_SIZE:
        if block_count(size, bs) == count:
            return bs
        bs *= 2
    return None


def _parse_request(topic: str, payload: bytes) -> tuple[str, str, BlockRequest]:
    parsed = parse_topic(topic)
    if parsed.kind is not TopicKind.BLOCK_REQUEST or parsed.device is None:
        raise ProtocolError(f"{topic} is not a block request topic")
    return parsed.fleet, parsed.device, decode(BlockRequest, payload)


class BlockServer:
    """Serves artifact blocks to many devices; thread-safe (`handle_request`/`on_published` from paho's thread)."""

    def __init__(
        self,
        publish: Callable[[str, bytes, int], int | None],
        artifact_path: Callable[[str], Path | ServedArtifact | None],
        *,
        rate_limit_bytes_per_s: float | None = 50e6,
        max_inflight: int = 64,
        coalesce_s: float = 0.5,
        coalesce_max_s: float = 5.0,
        resend_holdoff_s: float = 3.0,
        qos: int = 0,
        clock: Callable[[], float] = time.monotonic,
        on_ready: Callable[[], None] | None = None,
        ack_every: int = 1,
    ) -> None:
        if not 1 <= max_inflight <= MAX_WINDOW:
            raise ValueError(f"max_inflight must be 1..{MAX_WINDOW} (MQTT message ids), got {max_inflight}")
        if qos not in (0, 1):
            raise ValueError(f"blocks are published with QoS 0 or 1, not {qos}")
        self._publish = publish
        self._artifact = artifact_path
        self.rate = rate_limit_bytes_per_s
        self.max_inflight = max_inflight
        self.coalesce_s = coalesce_s
        self.coalesce_max_s = max(coalesce_s, coalesce_max_s)
        self.resend_holdoff_s = resend_holdoff_s
        self.qos = qos
        if ack_every < 1:
            raise ValueError(f"ack_every must be at least 1, got {ack_every}")
        self.ack_every = min(ack_every, max_inflight) if qos == 1 else 1
        self.clock = clock
        self.on_ready = on_ready
        self.stats = BlockServerStats()
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._order: list[tuple[str, str]] = []
        self._inflight: dict[int, int] = {}  # tracked message id -> blocks its report covers
        self._inflight_blocks = 0  # blocks handed to the client and not covered by a report yet
        self._uncovered = 0  # QoS 0 blocks sent since the last marker (ack_every > 1)
        self._early: OrderedDict[int, float] = OrderedDict()
        self._tokens = 0.0
        self._tokens_at = clock()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_log: dict[str, float] = {}

    # -- requests -------------------------------------------------------------------------------------------------
    def _log_once(self, sender: str, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self._last_log.get(sender, -1e9) >= 60.0:
            self._last_log[sender] = now
            log.warning(msg, *args)

    def handle_request(self, topic: str, payload: bytes) -> bool:
        """Merge one device's request into its artifact's wanted set; False (counted, logged) when refused."""
        try:
            fleet, device, request = _parse_request(topic, payload)
        except ProtocolError as exc:
            with self._cond:
                self.stats.bad_requests += 1
            self._log_once(topic, "block server: dropped a bad request on %s: %s", topic, str(exc)[:200])
            return False
        with self._cond:
            self.stats.requests += 1
            stream = self._stream(fleet, request)
            if stream is None:
                return False
            now = self.clock()
            since = stream.listening_since(device, now)
            if stream.pending == 0:
                stream.sending, stream.first_wait = False, now
            added = 0
            for byte_index, byte in enumerate(request.bitmap().to_bytes()):
                rest = byte
                while rest:
                    low = rest & -rest
                    index = byte_index * 8 + low.bit_length() - 1
                    added += stream.want(index, now=now, holdoff=self.resend_holdoff_s, since=since, stats=self.stats)
                    rest ^= low
            if added and not stream.sending:
                # debounce: wait until no request has added anything for coalesce_s, at most coalesce_max_s
                stream.ready_at = min(stream.first_wait + self.coalesce_max_s, now + self.coalesce_s)
            stream.last_active = now
            self._cond.notify_all()
        if added and self.on_ready is not None:
            self.on_ready()
        return True

    def _stream(self, fleet: str, request: BlockRequest) -> _Stream | None:
        key = (fleet, request.artifact_sha256)
        stream = self._streams.get(key)
        if stream is not None:
            if stream.count != request.block_count:
                self.stats.bad_requests += 1
                return None
            return stream
        found = self._artifact(request.artifact_sha256)
        path = found.path if isinstance(found, ServedArtifact) else found
        if path is None:
            self.stats.unknown_artifacts += 1
            self._log_once(request.artifact_sha256, "block server: unknown artifact %s", request.artifact_sha256)
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
        except OSError as exc:
            self._log_once(request.artifact_sha256, "block server: cannot open %s: %s", path, exc)
            return None
        bs = found.block_size if isinstance(found, ServedArtifact) else _infer_block_size(size, request.block_count)
        if bs is None or block_count(size, bs) != request.block_count:
            os.close(fd)
            self.stats.bad_requests += 1
            self._log_once(request.artifact_sha256, "block server: %s has no %s-block cut", path, request.block_count)
            return None
        stream = _Stream(
            fleet=fleet,
            sha256=request.artifact_sha256,
            path=path,
            size=size,
            block_size=bs,
            count=request.block_count,
            topic=artifact_blocks_topic(fleet, request.artifact_sha256),
            fd=fd,
            wanted=bytearray((request.block_count + 7) // 8),
            sent_at=[-1e9] * request.block_count,
        )
        self._streams[key] = stream
        self._order.append(key)
        return stream

    # -- sending --------------------------------------------------------------------------------------------------
    def on_published(self, mid: int) -> None:
        """The MQTT client finished with message `mid` (PUBACK for QoS 1, written for QoS 0)."""
        with self._cond:
            covered = self._inflight.pop(mid, None)
            if covered is not None:
                was_full = self._inflight_blocks >= self.max_inflight
                self._inflight_blocks -= covered
                self._cond.notify_all()
            else:
                # not counted yet (the report beat `publish` returning), or not ours: kept a while, by age
                was_full = False
                now = self.clock()
                self._early[mid] = now
                self._early.move_to_end(mid)
                while self._early and (
                    len(self._early) > 4096 or next(iter(self._early.values())) < now - EARLY_KEEP_S
                ):
                    self._early.popitem(last=False)
        if was_full and self.on_ready is not None:
            self.on_ready()

    def _refill(self, now: float) -> None:
        if self.rate is None:
            return
        burst = max(float(MAX_BLOCK_SIZE), self.rate * 0.05)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now

    def _pick(self, now: float) -> tuple[_Stream, int] | tuple[None, float]:
        """The next (stream, block) to send now, or (None, seconds to wait)."""
        wait = 1.0
        if self._inflight_blocks >= self.max_inflight:
            return None, wait
        self._refill(now)
        if self.rate is not None and self._tokens <= 0:
            return None, -self._tokens / self.rate
        for _ in range(len(self._order)):
            key = self._order.pop(0)
            self._order.append(key)
            stream = self._streams[key]
            if stream.pending == 0:
                if now - stream.last_active > IDLE_STREAM_S:
                    self._drop_stream(key)
                continue
            if stream.ready_at > now:
                wait = min(wait, stream.ready_at - now)
                continue
            index = stream.take_next(now)
            if index is not None:
                stream.sending = True
                return stream, index
        return None, wait

    def _drop_stream(self, key: tuple[str, str]) -> None:
        stream = self._streams.pop(key)
        self._order.remove(key)
        with contextlib.suppress(OSError):
            os.close(stream.fd)

    def pump(self, *, max_blocks: int = 256) -> float:
        """Send what is due now (up to `max_blocks`); returns how long until it is worth calling again."""
        for _ in range(max_blocks):
            with self._cond:
                now = self.clock()
                stream, index_or_wait = self._pick(now)
                if stream is None:
                    return float(index_or_wait)
                index = int(index_or_wait)
                length = min(stream.block_size, stream.size - index * stream.block_size)
                try:
                    payload = os.pread(stream.fd, length, index * stream.block_size)
                except OSError as exc:
                    self._log_once(stream.sha256, "block server: cannot read %s: %s", stream.path, exc)
                    if self._uncovered and not any(s.pending for s in self._streams.values()):
                        # no marker will follow to cover the blocks sent since the last one: release them now
                        self._inflight_blocks -= self._uncovered
                        self._uncovered = 0
                        self._cond.notify_all()
                    continue
                message = encode_block(stream.sha256, index, payload)
                if self.rate is not None:
                    self._tokens -= len(message)
                self.stats.blocks_sent += 1
                self.stats.bytes_sent += len(message)
                self.stats.payload_bytes_sent += len(payload)
                stream.last_active = now
                topic = stream.topic
                self._inflight_blocks += 1
                self.stats.max_inflight_seen = max(self.stats.max_inflight_seen, self._inflight_blocks)
                qos, covers = self.qos, 1
                if self.ack_every > 1:
                    self._uncovered += 1
                    if self._uncovered >= self.ack_every or not any(s.pending for s in self._streams.values()):
                        covers, self._uncovered = self._uncovered, 0  # a marker: its acknowledgement covers these
                    else:
                        qos, covers = 0, 0  # covered by the next marker
            try:
                mid = self._publish(topic, message, qos)  # outside the lock: the client may call back at once
            except Exception:  # the sending thread must not die of one failed publish: the device asks again
                log.exception("block server: publishing to %s failed", topic)
                mid = None
            if covers:
                with self._cond:
                    reported = self._early.pop(mid, None) if mid is not None else None
                    if mid is None or (reported is not None and reported >= self.clock() - EARLY_KEEP_S):
                        # not tracked, or already reported done before we could count it
                        self._inflight_blocks -= covers
                        self._cond.notify_all()
                    else:
                        self._inflight[mid] = covers
        return 0.0

    def tracks(self, qos: int) -> bool:
        """Whether a block published with `qos` is counted by message id (else `publish` should return None)."""
        return qos == self.qos

    @property
    def inflight(self) -> int:
        """Blocks handed to the client and not yet reported done (or covered by a marker reported done)."""
        with self._cond:
            return self._inflight_blocks

    @property
    def busy(self) -> bool:
        with self._cond:
            return any(s.pending for s in self._streams.values()) or self._inflight_blocks > 0

    def start(self) -> None:
        """Send from a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgefleet-blockserver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            wait = self.pump()
            if wait > 0:
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(timeout=min(wait, 0.5))

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._cond:
            for key in list(self._streams):
                self._drop_stream(key)
