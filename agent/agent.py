"""The device agent: one MQTT link, the updater, the running model and telemetry, all on one reactor.

Example (a device application)::

    reactor = Reactor()
    agent = Agent(config, reactor=reactor)
    agent.start()
    threading.Thread(target=reactor.run, daemon=True).start()
    result = agent.infer(x)              # from any thread; counted in the next telemetry window
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.errors import AgentError, InferenceError
from edgefleet.agent.mqtt import MqttLink, Will
from edgefleet.agent.reactor import Reactor, Timer
from edgefleet.agent.runner import InferenceResult, ModelRunner, SessionPool, runtime_version
from edgefleet.agent.slots import Slots
from edgefleet.agent.spool import Spool
from edgefleet.agent.telemetry import ModelTag, TelemetryReporter, rss_bytes
from edgefleet.agent.updater import Updater
from edgefleet.protocols import topics
from edgefleet.protocols.blocks import BlockRequest, decode_block
from edgefleet.protocols.codec import decode_command, encode
from edgefleet.protocols.commands import ConfigureCommand
from edgefleet.protocols.errors import ProtocolError
from edgefleet.protocols.messages import (
    Birth,
    Capabilities,
    DeviceState,
    JobEvent,
    RunningModel,
    SlotState,
    Status,
)
from edgefleet.protocols.telemetry import ErrorKind

__all__ = ["Agent"]

log = logging.getLogger(__name__)


class Agent:
    """One device. Every callback runs on `reactor`; `infer` may be called from any thread."""

    # slots, lazily built topics and a shared lock keep a simulated device near 10 KiB (benchmarks/simulator.py)
    __slots__ = (
        "_bad_messages",
        "_connection_stamp",
        "_corrupted",
        "_dropped",
        "_label_credit",
        "_label_rate",
        "_last_bad_log",
        "_lock",
        "_on_crash",
        "_runner",
        "_sessions",
        "_tag",
        "_threads",
        "_watched",
        "_window_timer",
        "alive",
        "config",
        "last_event",
        "link",
        "reactor",
        "slots",
        "telemetry",
        "telemetry_window_s",
        "updater",
        "wall",
    )

    def __init__(
        self,
        config: AgentConfig,
        *,
        reactor: Reactor,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        sessions: SessionPool | None = None,
        on_crash: Callable[[Agent], None] | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.wall = wall
        # When the current (or next) connection started: its last will, its online status and its birth carry it,
        # so the controller applies this connection's will and ignores an older connection's late one.
        self._connection_stamp = wall()
        self._sessions = sessions
        self._on_crash = on_crash
        device = config.device_id
        self._watched: set[str] | None = None
        self.slots = Slots(config.data_dir / "slots", durable=config.durable)
        self.link = MqttLink(
            reactor,
            client_id=device,
            host=config.host,
            port=config.port,
            username=config.username or device,
            password=config.password,
            will=self._will,
            keepalive=config.keepalive_s,
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            on_publish=self._on_publish,
            tls=config.tls_context(),
        )
        self.updater = Updater(config, self, reactor, wall=wall, slots=self.slots)
        self._lock = threading.Lock()  # the running model and the telemetry window, shared by `infer` callers
        self.telemetry = TelemetryReporter(
            self._new_spool,
            publish=self._publish_telemetry,
            link=self.link,
            session=secrets.token_hex(8),
            started=wall(),
            lock=self._lock,
        )
        self.telemetry_window_s = config.telemetry_window_s
        self._runner: ModelRunner | None = None
        self._tag: ModelTag | None = None
        # Set by a configure command; None: the profile's thread count, every label counted.
        self._threads: int | None = None
        self._label_rate = 1.0
        self._label_credit = 0.0  # labels are kept evenly: one each time the credit reaches 1 (no RNG state)
        self._window_timer: Timer | None = None
        self._bad_messages = 0
        self._last_bad_log = -1e9
        self.alive = False
        self._corrupted: set[int] | None = None
        self._dropped = False
        self.last_event: JobEvent | None = None

    def _topic(self, kind: topics.TopicKind) -> str:
        return topics.device_topic(kind, self.config.fleet, self.config.device_id)

    def _new_spool(self) -> Spool:
        cfg = self.config
        return Spool(cfg.data_dir / "outbox", max_items=cfg.outbox_max, durable=cfg.durable)

    def _publish_telemetry(self, payload: bytes) -> int:
        return self.link.publish(self._topic(topics.TopicKind.TELEMETRY), payload, qos=1)

    # -- life cycle -----------------------------------------------------------------------------------------------
    def start(self, *, connect: bool = True) -> None:
        """Resume the stored job (before connecting, so nothing runs half-installed) and connect."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.alive = True
        self.updater.resume()
        self._window_timer = self.reactor.call_later(self.telemetry_window_s, self._close_window)
        if connect:
            self.link.connect()

    def stop(self) -> None:
        """Leave cleanly: record a clean exit, publish offline, disconnect."""
        if not self.alive:
            return
        self.alive = False
        self.updater.mark_clean_exit()
        if self._window_timer is not None:
            self._window_timer.cancel()
        if self.updater.fetcher is not None:
            self.updater.fetcher.cancel()
        if self.link.connected:
            self.link.publish(
                self._topic(topics.TopicKind.STATUS), self._status(DeviceState.OFFLINE), qos=1, retain=True
            )
        self.link.disconnect()

    def crash(self) -> None:
        """Stop as a power cut would: no clean-exit mark, no offline status (the broker's last will says it)."""
        log.warning("device %s: crashed (simulated)", self.config.device_id)
        self.alive = False
        if self._window_timer is not None:
            self._window_timer.cancel()
        if self.updater.fetcher is not None:
            self.updater.fetcher.cancel(crash=True)
        self.link.abandon()
        if self._on_crash is not None:
            self._on_crash(self)

    # -- MQTT -----------------------------------------------------------------------------------------------------
    def _status(self, state: DeviceState) -> bytes:
        return encode(Status(state=state, timestamp=self.wall()))

    def _will(self) -> Will:
        """The last will of the connection about to be made, stamped with its start (see `_connection_stamp`)."""
        self._connection_stamp = self.wall()
        offline = Status(state=DeviceState.OFFLINE, timestamp=self._connection_stamp)
        return Will(self._topic(topics.TopicKind.STATUS), encode(offline))

    def _on_connect(self, session_present: bool) -> None:
        if not self.alive:
            return
        self.link.subscribe(topics.device_filters(self.config.fleet, self.config.device_id))
        if self._watched:
            self.link.subscribe([self._artifact_topic(d) for d in self._watched], qos=0)
        online = encode(Status(state=DeviceState.ONLINE, timestamp=self._connection_stamp))
        self.link.publish(self._topic(topics.TopicKind.STATUS), online, qos=1, retain=True)
        self.link.publish(self._topic(topics.TopicKind.BIRTH), encode(self.birth()), qos=1)
        self.telemetry.drain()
        self.updater.on_connected()

    def _on_disconnect(self) -> None:
        log.info("device %s: disconnected", self.config.device_id)

    def _on_publish(self, mid: int) -> None:
        self.telemetry.on_publish(mid)

    def _artifact_topic(self, digest: str) -> str:
        return topics.artifact_blocks_topic(self.config.fleet, digest)

    def _bad_message(self, what: str, exc: Exception) -> None:
        self._bad_messages += 1
        now = time.monotonic()
        if now - self._last_bad_log >= 60.0:
            self._last_bad_log = now
            log.warning(
                "device %s: dropped %s (%s bad so far): %s", self.config.device_id, what, self._bad_messages, exc
            )

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not self.alive:
            return
        try:
            parsed = topics.parse_topic(topic)
            if parsed.kind is topics.TopicKind.COMMAND:
                self.updater.on_command(decode_command(payload))
            elif parsed.kind is topics.TopicKind.ARTIFACT_BLOCKS:
                block = decode_block(payload, expected_artifact=parsed.digest)
                faults = self.config.faults
                if block.index in faults.corrupt_blocks and block.index not in (self._corrupted or ()):
                    self._corrupted = (self._corrupted or set()) | {block.index}
                    zeros = bytes(
                        len(block.payload)
                    )  # corrupted after the transport checksum: only the manifest catches it
                    block = type(block)(block.artifact_sha256, block.index, zeros, hashlib.sha256(zeros).hexdigest())
                self.updater.on_block(block)
                self._maybe_drop()
        except ProtocolError as exc:
            self._bad_message(f"message on {topic}", exc)
        except Exception as exc:  # noqa: BLE001 - one message must never stop (or spin) the loop; logged once a minute
            self._bad_message(f"message on {topic} (it failed: {type(exc).__name__})", exc)

    def _maybe_drop(self) -> None:
        fraction = self.config.faults.drop_at_fraction
        fetcher = self.updater.fetcher
        if fraction is None or self._dropped or fetcher is None:
            return
        if fetcher.download.have >= fraction * fetcher.download.count:
            self._dropped = True
            log.warning("device %s: dropping the connection at %.0f%% (fault)", self.config.device_id, fraction * 100)
            self.link.drop()

    # -- UpdateHost -----------------------------------------------------------------------------------------------
    def publish_event(self, event: JobEvent) -> None:
        self.last_event = event
        self.link.publish(self._topic(topics.TopicKind.EVENTS), encode(event), qos=1)

    def send_block_request(self, request: BlockRequest) -> bool:
        if not self.link.connected:
            return False  # asked again on connect
        self.link.publish(self._topic(topics.TopicKind.BLOCK_REQUEST), encode(request), qos=1)
        return True

    def input_pending(self) -> bool:
        return self.link.input_pending()

    def watch_artifact(self, digest: str, *, on: bool) -> None:
        topic = self._artifact_topic(digest)
        watched = self._watched or set()
        if on and digest not in watched:
            self._watched = watched | {digest}
            if self.link.connected:
                self.link.subscribe([topic], qos=0)
        elif not on and digest in watched:
            self._watched = (watched - {digest}) or None
            if self.link.connected:
                self.link.unsubscribe([topic])

    @property
    def threads(self) -> int:
        """onnxruntime threads: the class profile's, unless a configure command set another."""
        return self._threads if self._threads is not None else self.config.profile.threads

    def load_runner(self, path: Path, digest: str) -> ModelRunner:
        # A simulated device runs on one host thread: its reference times are at its own thread count and the
        # host's at one, so device / host already holds the device's thread scaling (agent/speed.py).
        threads = self.threads if self.config.speed is None else 1
        session = self._sessions.get(digest, path, threads=threads) if self._sessions is not None else None
        speed, slow = self.config.speed, self.config.faults.slow_factor
        scale: float | Callable[[], float] = slow if speed is None else speed.scaler(path, times=slow)
        return ModelRunner(path, threads=threads, latency_scale=scale, session=session)

    def configure(self, command: ConfigureCommand) -> None:
        """Apply a configure command: telemetry window, thread count (the model is reloaded at the next
        inference), the fraction of labelled inferences counted for accuracy, and the log level."""
        if command.telemetry_window_s is not None:
            self.telemetry_window_s = command.telemetry_window_s
        if command.threads is not None and command.threads != self.threads:
            with self._lock:
                self._threads = command.threads
                self._runner = None
        if command.label_sample_rate is not None:
            self._label_rate = command.label_sample_rate
        if command.log_level is not None:
            logging.getLogger("edgefleet.agent").setLevel(command.log_level.upper())

    def model_changed(self, runner: ModelRunner | None = None) -> None:
        """The active slot changed: the telemetry window so far is closed under the model it ran on, so no window
        mixes two models' latencies and accuracy (the gates and triggers judge each model on its own windows);
        `runner` is the new model's session when the caller has one loaded (validation), else it loads lazily."""
        with self._lock:
            previous = self._tag
            self._runner = runner
            self._tag = None
        if self._window_timer is not None and self.alive and not self.telemetry.window_empty():
            self._window_timer.cancel()
            self.telemetry.close_window(self.wall(), model=previous, rss=rss_bytes())
            self._window_timer = self.reactor.call_later(self.telemetry_window_s, self._close_window)
        if runner is not None:
            self.model_tag()

    # -- inference and telemetry ----------------------------------------------------------------------------------
    def runner(self) -> ModelRunner:
        with self._lock:
            if self._runner is None:
                current = self.slots.current()
                if current is None:
                    raise InferenceError(f"device {self.config.device_id} has no model yet; deploy one first")
                self._runner = self.load_runner(current.model_path, current.digest)
                self._tag = ModelTag(str(current.meta.get("model_name", "model")), current.digest, current.version)
            return self._runner

    def infer(self, x: Any, *, label: int | None = None) -> InferenceResult:
        """Run the active model on one batch `x`; counted (with `label`, for accuracy) in the telemetry window."""
        try:
            result = self.runner().run(x)
        except AgentError:
            self.telemetry.record_error(ErrorKind.INFERENCE)
            self.reactor.call_soon_threadsafe(lambda: self.updater.on_inference(latency_s=0.0, error=True))
            raise
        if label is not None and self._label_rate < 1.0:
            self._label_credit += self._label_rate
            if self._label_credit >= 1.0:
                self._label_credit -= 1.0
            else:
                label = None  # not sampled: counted as an unlabelled inference
        for i in range(len(result.predicted)):
            correct = None if label is None else bool(int(result.predicted[i]) == int(label))
            self.telemetry.record(latency_s=result.latency_s, confidence=float(result.confidence[i]), correct=correct)
        latency = result.latency_s
        self.reactor.call_soon_threadsafe(lambda: self.updater.on_inference(latency_s=latency, error=False))
        return result

    def model_tag(self) -> ModelTag | None:
        """The active model's name, digest and version (read from its slot once per model change)."""
        if self._tag is None:
            current = self.slots.current()
            if current is None:
                return None
            self._tag = ModelTag(str(current.meta.get("model_name", "model")), current.digest, current.version)
        return self._tag

    def _close_window(self) -> None:
        if not self.alive:
            return
        self.telemetry.close_window(self.wall(), model=self.model_tag(), rss=rss_bytes())
        self._window_timer = self.reactor.call_later(self.telemetry_window_s, self._close_window)

    def birth(self) -> Birth:
        profile = self.config.profile
        slots: dict[str, Any] = {"active": self.slots.current_name()}
        for name in ("a", "b"):
            info = self.slots.info(name)
            if info is not None:
                slots[name] = RunningModel(
                    name=str(info.meta.get("model_name", "model")), digest=info.digest, version=info.version
                )
        if slots["active"] is not None and slots["active"] not in slots:
            slots["active"] = None
        running = slots.get(slots["active"]) if slots["active"] else None
        rec = self.updater.record
        return Birth(
            agent_version=self.config.agent_version,
            device_class=profile.name,
            fleet=self.config.fleet,
            capabilities=Capabilities(
                onnxruntime_version=runtime_version(),
                opset=profile.opset,
                cpu_count=os.cpu_count() or 1,
                ram_bytes=profile.ram_budget_bytes,
                threads=profile.threads,
                int8_dot_product=profile.int8_dot_product,
            ),
            running=running,
            slots=SlotState(**slots),
            job_id=rec.job_id,
            job_state=self.updater.report_state(),
            timestamp=self._connection_stamp,  # the connection's start, as its will and online status say
        )
