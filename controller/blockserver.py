"""The controller's block server: answers devices' block requests, one broadcast per block for all of them.

Devices ask on their own `.../blocks/req` topic for the blocks they miss (a bitmap). Requests for the same
artifact are merged into one *wanted* set per artifact; sending starts once no request has added a block for
`coalesce_s` (at most `coalesce_max_s` after the first), and each wanted block is published once on the
shared `artifact_blocks_topic(fleet, sha256)`, which every device fetching that artifact subscribes to: N devices
starting together cost about one artifact of output, not N.
A device that joins mid-stream adds the blocks it missed; the cursor wraps round to send them after the rest.
A block asked for again within `resend_holdoff_s` of being sent is not sent again yet (it is most likely still
on its way); the device asks again after its own, growing timeout if it really lost it.

Output is bounded twice: a token bucket (`rate_limit_bytes_per_s`) and an in-flight window (`max_inflight`
publishes handed to the MQTT client and not yet reported by `on_published`), so a big rollout never queues
an unbounded backlog in the client (paho's QoS 1 message ids also run out at 65,535).

Wiring into a controller's MQTT service (paho with `loop_start`)::

    server = BlockServer(
        publish=lambda topic, payload, qos: client.publish(topic, payload, qos=qos).mid,
        artifact_path=store.path_for_sha256,          # sha256 -> Path | ServedArtifact | None
        rate_limit_bytes_per_s=20e6,
        max_inflight=64,
    )
    client.subscribe(f"edgefleet/v1/{fleet}/device/+/blocks/req")   # or controller_filters(fleet)
    # in on_message, for topics whose parse_topic(...).kind is TopicKind.BLOCK_REQUEST:
    server.handle_request(message.topic, message.payload)
    # in on_publish:
    server.on_published(mid)
    server.start()     # a daemon thread that sends; server.stop() on shutdown
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

    def want(self, index: int, *, now: float, holdoff: float) -> bool:
        if self.wanted[index >> 3] & (1 << (index & 7)):
            return False
        if now - self.sent_at[index] < holdoff:
            return False  # just sent: most likely still on its way to the device that asks again

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


def _parse_request(topic: str, payload: bytes) -> tuple[str, BlockRequest]:
    parsed = parse_topic(topic)
    if parsed.kind is not TopicKind.BLOCK_REQUEST or parsed.device is None:
        raise ProtocolError(f"{topic} is not a block request topic")
    return parsed.fleet, decode(BlockRequest, payload)


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
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self._publish = publish
        self._artifact = artifact_path
        self.rate = rate_limit_bytes_per_s
        self.max_inflight = max_inflight
        self.coalesce_s = coalesce_s
        self.coalesce_max_s = max(coalesce_s, coalesce_max_s)
        self.resend_holdoff_s = resend_holdoff_s
        self.qos = qos
        self.clock = clock
        self.stats = BlockServerStats()
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._order: list[tuple[str, str]] = []
        self._inflight: set[int] = set()
        self._early: OrderedDict[int, None] = OrderedDict()
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
            fleet, request = _parse_request(topic, payload)
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
            if stream.pending == 0:
                stream.sending, stream.first_wait = False, now
            added = 0
            for byte_index, byte in enumerate(request.bitmap().to_bytes()):
                rest = byte
                while rest:
                    low = rest & -rest
                    added += stream.want(byte_index * 8 + low.bit_length() - 1, now=now, holdoff=self.resend_holdoff_s)
                    rest ^= low
            if added and not stream.sending:
                # debounce: wait until no request has added anything for coalesce_s, at most coalesce_max_s
                stream.ready_at = min(stream.first_wait + self.coalesce_max_s, now + self.coalesce_s)
            stream.last_active = now
            self._cond.notify_all()
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
            if mid in self._inflight:
                self._inflight.discard(mid)
                self._cond.notify_all()
            else:
                self._early[mid] = None
                while len(self._early) > 4096:
                    self._early.popitem(last=False)

    def _refill(self, now: float) -> None:
        if self.rate is None:
            return
        burst = max(float(MAX_BLOCK_SIZE), self.rate * 0.05)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now

    def _pick(self, now: float) -> tuple[_Stream, int] | tuple[None, float]:
        """The next (stream, block) to send now, or (None, seconds to wait)."""
        wait = 1.0
        if len(self._inflight) >= self.max_inflight:
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
                    continue
                message = encode_block(stream.sha256, index, payload)
                if self.rate is not None:
                    self._tokens -= len(message)
                self.stats.blocks_sent += 1
                self.stats.bytes_sent += len(message)
                self.stats.payload_bytes_sent += len(payload)
                stream.last_active = now
                topic = stream.topic
            mid = self._publish(topic, message, self.qos)  # outside the lock: the client may call back at once
            if mid is not None:
                with self._cond:
                    if mid in self._early:  # already reported done before we could count it
                        del self._early[mid]
                    else:
                        self._inflight.add(mid)
        return 0.0

    @property
    def busy(self) -> bool:
        with self._cond:
            return any(s.pending for s in self._streams.values()) or bool(self._inflight)

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
