"""The controller's message handlers: births, status, telemetry, job events and block requests.

`ControllerService.handle(topic, payload)` is what the MQTT client calls for every message. It never raises:
a message that cannot be used is counted in `edgefleet_messages_rejected_total{kind, reason}` and logged at
most once per sender per minute. State changes go through the database in transactions (several replicas may
run behind MQTT 5 shared subscriptions); telemetry is added up in memory and flushed in bulk by `flush()`,
which a background thread calls every `flush_interval_s` or after `flush_every` messages.

Example::

    service = ControllerService(db, metrics=ControllerMetrics(registry=CollectorRegistry()))
    service.start()
    service.handle("edgefleet/v1/default/device/pi-001/telemetry", payload)
    service.stop()   # flushes what is pending
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.tables import utcnow
from edgefleet.controller.errors import ControllerError
from edgefleet.controller.periodic import Periodic
from edgefleet.controller.service.directory import DeviceDirectory, DeviceInfo
from edgefleet.controller.service.metrics import ControllerMetrics
from edgefleet.controller.service.ratelog import RateLimitedLog
from edgefleet.controller.service.rollups import RollupAggregator
from edgefleet.controller.service.state_updates import apply_birth, apply_job_event, apply_status
from edgefleet.protocols.blocks import BlockRequest
from edgefleet.protocols.codec import decode
from edgefleet.protocols.errors import (
    DecodeError,
    OversizeError,
    ProtocolError,
    SchemaError,
    TopicError,
    UnsupportedSchemaError,
)
from edgefleet.protocols.messages import Birth, JobEvent, Status
from edgefleet.protocols.telemetry import TelemetryBatch
from edgefleet.protocols.topics import ParsedTopic, TopicKind, parse_topic

__all__ = ["BlockRequestHook", "ControllerService", "Rejected"]

log = logging.getLogger(__name__)

MAX_CACHED_TOPICS = 200_000

# Called with (device id, device class, request) for each valid block request; serving blocks is the
# transfer issue's work, routing them is ours.
BlockRequestHook = Callable[[str, str, BlockRequest], None]


class Rejected(Exception):  # noqa: N818 - a control-flow signal inside the service, not an error for callers
    """A message that is well-formed MQTT but not usable; `reason` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _reason(exc: ProtocolError) -> str:
    for cls, reason in (
        (OversizeError, "oversize"),
        (DecodeError, "decode"),
        (UnsupportedSchemaError, "unsupported_schema"),
        (SchemaError, "schema"),
        (TopicError, "topic"),
    ):
        if isinstance(exc, cls):
            return reason
    return "invalid"


class ControllerService:
    """Routes device messages to handlers; owns the telemetry aggregator and its flusher thread."""

    def __init__(
        self,
        db: Database,
        *,
        metrics: ControllerMetrics,
        fleet: str = "+",
        window_s: int = 60,
        retention: dt.timedelta = dt.timedelta(days=7),
        flush_every: int = 5000,
        flush_interval_s: float = 0.5,
        block_requests: BlockRequestHook | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.fleet = fleet
        self.clock = clock
        self.block_requests = block_requests
        self.flush_every = flush_every
        self.flush_interval_s = flush_interval_s
        self.directory = DeviceDirectory(db)
        self.rollups = RollupAggregator(window_s=window_s, retention=retention, clock=clock)
        self.ratelog = RateLimitedLog(log)
        self._last_seq: dict[str, tuple[str, int]] = {}
        self._topics: dict[str, ParsedTopic] = {}
        self._accepted_telemetry = metrics.messages_accepted.labels(TopicKind.TELEMETRY.value)
        self._flusher = Periodic(self.flush, interval_s=flush_interval_s, name="edgefleet-flush", wait_first=True)
        self.flush_errors = 0
        self._handlers: dict[TopicKind, Callable[[ParsedTopic, DeviceInfo, bytes], None]] = {
            TopicKind.TELEMETRY: self._on_telemetry,
            TopicKind.BIRTH: self._on_birth,
            TopicKind.STATUS: self._on_status,
            TopicKind.EVENTS: self._on_event,
            TopicKind.BLOCK_REQUEST: self._on_block_request,
        }

    # ------------------------------------------------------------------ entry point
    def handle(self, topic: str, payload: bytes) -> None:
        """Handle one message; never raises (see the module docstring)."""
        kind = "unknown"
        sender = topic
        try:
            parsed = self._topics.get(topic)
            if parsed is None:
                parsed = self._parse(topic)
            kind = parsed.kind.value
            sender = parsed.device or topic
            handler = self._route(parsed)
            handler(parsed, self._device(parsed), payload)
        except Rejected as exc:
            self._reject(kind, exc.reason, sender, str(exc))
        except ProtocolError as exc:
            self._reject(kind, _reason(exc), sender, str(exc))
        except ControllerError as exc:
            self._reject(kind, "database", sender, str(exc))
        except Exception as exc:  # one bad message never stops the loop
            log.debug("handler crash", exc_info=True)
            self._reject(kind, "internal", sender, f"{type(exc).__name__}: {exc}")

    def _reject(self, kind: str, reason: str, sender: str, message: str) -> None:
        self.metrics.rejected(kind, reason)
        self.ratelog.warn(sender, "rejected %s message from %s (%s): %s", kind, sender, reason, message)

    def _parse(self, topic: str) -> ParsedTopic:
        # Each device publishes on a handful of topics: parse each once (valid ones only, bounded).
        parsed = parse_topic(topic)
        if len(self._topics) >= MAX_CACHED_TOPICS:
            self._topics.clear()
        self._topics[topic] = parsed
        return parsed

    def _route(self, parsed: ParsedTopic) -> Callable[[ParsedTopic, DeviceInfo, bytes], None]:
        handler = self._handlers.get(parsed.kind)
        if handler is None:
            raise Rejected("topic", f"{parsed.kind.value} topics are not for the controller")
        if self.fleet not in {"+", parsed.fleet}:
            raise Rejected("wrong_fleet", f"fleet {parsed.fleet} is not served by this controller")
        return handler

    def _device(self, parsed: ParsedTopic) -> DeviceInfo:
        assert parsed.device is not None  # noqa: S101 - every routed kind is a per-device topic
        info = self.directory.get(parsed.device)
        if info is None:
            raise Rejected("unknown_device", f"device {parsed.device} is not registered")
        if info.fleet != parsed.fleet:
            raise Rejected("wrong_fleet", f"device {parsed.device} belongs to fleet {info.fleet}, not {parsed.fleet}")
        return info

    # ------------------------------------------------------------------ telemetry (hot path)
    def _on_telemetry(self, parsed: ParsedTopic, info: DeviceInfo, payload: bytes) -> None:
        batch = decode(TelemetryBatch, payload)
        device_id = info.device_id
        last = self._last_seq.get(device_id)
        if last is not None and last[0] == batch.session and batch.seq <= last[1]:
            raise Rejected("duplicate", f"batch {batch.session}/{batch.seq} was already recorded")
        if batch.model_digest is not None and not self.directory.digest_allowed(batch.model_digest, info.class_name):
            raise Rejected(
                "wrong_class", f"model {batch.model_digest[:12]} is an artifact of another class than {info.class_name}"
            )
        self._last_seq[device_id] = (batch.session, batch.seq)
        self.metrics.record_telemetry(info.class_name, batch.model_name or "none", batch.model_version, batch)
        self.rollups.add(device_id, info.class_name, batch, received_at=self.clock())
        self._accepted_telemetry.inc()
        if self.rollups.pending_messages >= self.flush_every and not self._flusher.woken:
            self._flusher.wake()

    # ------------------------------------------------------------------ state messages
    def _on_birth(self, parsed: ParsedTopic, info: DeviceInfo, payload: bytes) -> None:
        birth = decode(Birth, payload)
        if birth.device_class != info.class_name:
            raise Rejected("wrong_class", f"birth says class {birth.device_class}, the registry says {info.class_name}")
        if birth.fleet != info.fleet:
            raise Rejected("wrong_fleet", f"birth says fleet {birth.fleet}, the registry says {info.fleet}")
        apply_birth(self.db, info.device_id, birth, now=self.clock())
        self.metrics.accepted(TopicKind.BIRTH.value)

    def _on_status(self, parsed: ParsedTopic, info: DeviceInfo, payload: bytes) -> None:
        status = decode(Status, payload)
        apply_status(self.db, info.device_id, status, now=self.clock())
        self.metrics.accepted(TopicKind.STATUS.value)

    def _on_event(self, parsed: ParsedTopic, info: DeviceInfo, payload: bytes) -> None:
        event = decode(JobEvent, payload)
        if not apply_job_event(self.db, info.device_id, event, now=self.clock()):
            raise Rejected("unknown_job", f"job {event.job_id} is not a job of device {info.device_id}")
        self.metrics.accepted(TopicKind.EVENTS.value)

    def _on_block_request(self, parsed: ParsedTopic, info: DeviceInfo, payload: bytes) -> None:
        request = decode(BlockRequest, payload)
        if self.block_requests is not None:
            self.block_requests(info.device_id, info.class_name, request)
        else:
            log.debug("block request from %s for %s: no block server attached", info.device_id, request.artifact_sha256)
        self.metrics.accepted(TopicKind.BLOCK_REQUEST.value)

    # ------------------------------------------------------------------ flushing
    def flush(self) -> int:
        """Write pending rollups now; returns the messages recorded (0 when a flush failed, data kept)."""
        try:
            return self.rollups.flush(self.db)
        except ControllerError as exc:
            self.flush_errors += 1
            self.ratelog.warn("flush", "telemetry flush failed, will retry: %s", exc)
            return 0

    def start(self) -> None:
        self._flusher.start()

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the flusher and write what is pending (retrying briefly if the database is busy)."""
        self._flusher.stop(timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.rollups.pending_messages and time.monotonic() < deadline:
            if not self.flush():
                time.sleep(0.2)

    def stats(self) -> dict[str, Any]:
        return {
            "recorded_messages": self.rollups.recorded_messages,
            "pending_messages": self.rollups.pending_messages,
            "flush_errors": self.flush_errors,
        }
