"""The controller process: registry database, message service, MQTT connection and metrics endpoint together.

`edgefleet serve`, `edgefleet demo` and the ingest benchmark run a `ControllerApp`. It runs the rollout engine
(`RolloutRunner`, one tick a second) unless `rollouts=False`, and the recompression loop (`RecompressionRunner`:
a step every `recompress_interval_s`, builds on a worker thread) unless `recompress=False`. Unless a
`block_requests` hook is given (or `serve_blocks=False`), it serves artifact blocks from the store to the devices
that ask (`BlockServing`), counting the bytes in `edgefleet_artifact_bytes_served_total{device_class}`.

Example::

    app = ControllerApp(settings, registry=CollectorRegistry())
    app.start()
    ...
    app.stop()
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from sqlmodel import col, func, select

from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.config import Settings
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.home import open_database
from edgefleet.controller.data.tables import DeploymentJob, Device, utcnow
from edgefleet.controller.errors import ControllerError, MqttError
from edgefleet.controller.recompress.loop import Builder, RecompressionLoop
from edgefleet.controller.recompress.runner import RecompressionRunner, default_builder
from edgefleet.controller.rollout.engine import RolloutEngine
from edgefleet.controller.rollout.metrics import RolloutCollector
from edgefleet.controller.rollout.runner import RolloutRunner
from edgefleet.controller.service.blockserver import BlockServer
from edgefleet.controller.service.handlers import BlockRequestHook, ControllerService
from edgefleet.controller.service.metrics import ControllerMetrics
from edgefleet.controller.service.mqtt import MqttClient
from edgefleet.protocols.blocks import BlockRequest
from edgefleet.protocols.codec import encode
from edgefleet.protocols.topics import artifact_blocks_topic, block_request_topic, controller_filters

__all__ = ["BlockServing", "ControllerApp", "device_state_counts", "job_state_counts"]

MAX_TRACKED_ARTIFACTS = 10_000

log = logging.getLogger(__name__)


def device_state_counts(db: Database) -> Callable[[], Mapping[tuple[str, ...], int]]:
    def counts() -> Mapping[tuple[str, ...], int]:
        with db.reading("counting devices") as session:
            rows = session.exec(
                select(Device.class_name, Device.online, func.count()).group_by(
                    col(Device.class_name), col(Device.online)
                )
            ).all()
        return {(c, "online" if online else "offline"): int(n) for c, online, n in rows}

    return counts


def job_state_counts(db: Database) -> Callable[[], Mapping[tuple[str, ...], int]]:
    def counts() -> Mapping[tuple[str, ...], int]:
        with db.reading("counting jobs") as session:
            rows = session.exec(select(DeploymentJob.state, func.count()).group_by(col(DeploymentJob.state))).all()
        return {(state,): int(n) for state, n in rows}

    return counts


class BlockServing:
    """The service's block-request hook in front of a `BlockServer` that publishes through the controller's client.

    The hook is called on paho's thread with (device id, class, request); the server sends from its own thread.
    Bytes are counted per device class of the artifact (the class of the devices asking for it).
    Blocks go to the broker with QoS 1 (`MqttClient.publish_tracked`; devices subscribe with QoS 0): the server's
    rate limit bounds the bytes per second and its in-flight window (`max_inflight`, never above the client's own
    limit) the blocks the broker has not acknowledged yet; every `ack_every`-th block carries the acknowledgement
    for those before it (the others go with QoS 0, see `BlockServer`).
    """

    def __init__(
        self,
        *,
        mqtt: MqttClient,
        store: ArtifactStore,
        metrics: ControllerMetrics,
        fleet_of: Callable[[str], str | None],
        rate_limit_bytes_per_s: float | None = 20e6,
        max_inflight: int = 64,
        ack_every: int = 8,
    ) -> None:
        self.mqtt = mqtt
        self.metrics = metrics
        self.fleet_of = fleet_of
        self.server = BlockServer(
            self._publish,
            store.path_for_sha256,
            rate_limit_bytes_per_s=rate_limit_bytes_per_s,
            max_inflight=max(1, min(max_inflight, mqtt.max_inflight or max_inflight)),  # 0: paho unlimited
            qos=1,
            ack_every=ack_every,
        )
        self._class_of_topic: dict[str, str] = {}
        self.publish_errors = 0

    def __call__(self, device_id: str, class_name: str, request: BlockRequest) -> None:
        fleet = self.fleet_of(device_id)
        if fleet is None:
            return
        topic = artifact_blocks_topic(fleet, request.artifact_sha256)
        if topic not in self._class_of_topic and len(self._class_of_topic) >= MAX_TRACKED_ARTIFACTS:
            self._class_of_topic.clear()
        self._class_of_topic[topic] = class_name
        self.server.handle_request(block_request_topic(fleet, device_id), encode(request))

    def _publish(self, topic: str, payload: bytes, qos: int) -> int | None:
        # Runs on the server's thread: an exception here would end it, so a failed publish is counted and dropped
        # (the device asks again after its timeout).
        try:
            if self.server.tracks(qos):
                mid = self.mqtt.publish_tracked(topic, payload, qos=qos, on_done=self.server.on_published)
            else:  # covered by the next marker's acknowledgement
                mid = None
                self.mqtt.publish(topic, payload, qos=qos, timeout=None)
        except MqttError as exc:
            self.publish_errors += 1
            log.debug("block publish to %s failed: %s", topic, exc)
            return None
        self.metrics.bytes_served(self._class_of_topic.get(topic, "unknown"), len(payload))
        return mid

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class ControllerApp:
    """Wires settings into a running controller; `start()` returns once MQTT is connected."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        db: Database | None = None,
        block_requests: BlockRequestHook | None = None,
        serve_blocks: bool = True,
        block_rate_bytes_per_s: float | None = 20e6,
        rollouts: bool = True,
        rollout_interval_s: float = 1.0,
        clock: Callable[[], dt.datetime] = utcnow,
        recompress: bool = True,
        recompress_interval_s: float = 5.0,
        recompress_builder: Builder | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.db = db if db is not None else open_database(settings)
        self.metrics = ControllerMetrics(
            registry=self.registry,
            device_states=device_state_counts(self.db),
            job_states=job_state_counts(self.db),
        )
        self.service = ControllerService(
            self.db,
            metrics=self.metrics,
            fleet=settings.fleet,
            window_s=settings.telemetry_window_s,
            retention=dt.timedelta(days=settings.telemetry_retention_days),
            flush_every=settings.flush_every,
            flush_interval_s=settings.flush_interval_s,
            block_requests=block_requests,
            clock=clock,
        )
        self.blocks: BlockServing | None = None
        username, password = settings.mqtt_credentials()
        subscriptions = controller_filters(settings.fleet)
        if settings.shared_subscriptions:
            # Replicas split the device topics; brokers send no retained messages to shared subscriptions, so
            # each replica also reads the retained status topics itself (applying a status is idempotent).
            subscriptions = (
                *controller_filters(settings.fleet, shared_group=settings.shared_group),
                *(f for f in subscriptions if f.endswith("/status")),
            )
        self.mqtt = MqttClient(
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            client_id=settings.mqtt_client_id,
            username=username,
            password=password,
            on_message=self.service.handle,
            subscriptions=subscriptions,
            tls=settings.mqtt_tls,
        )
        if block_requests is None and serve_blocks:
            self.blocks = BlockServing(
                mqtt=self.mqtt,
                store=ArtifactStore(settings.store_dir),
                metrics=self.metrics,
                fleet_of=self._fleet_of,
                rate_limit_bytes_per_s=block_rate_bytes_per_s,
            )
            self.service.block_requests = self.blocks
        # Rollouts advance on their own thread, one database transaction per step (restart-safe); their state is
        # exported from the database at scrape time.
        self.rollouts: RolloutRunner | None = None
        if rollouts:
            engine = RolloutEngine(self.db, publisher=self.mqtt, metrics=self.metrics)
            self.rollouts = RolloutRunner(engine, interval_s=rollout_interval_s)
            self.registry.register(RolloutCollector(self.db))
        # The closed loop: triggers checked on a timer thread, builds (planning, 10-150 s) on a worker thread.
        self.recompression: RecompressionLoop | None = None
        self._recompress_runner: RecompressionRunner | None = None
        if recompress:
            builder = recompress_builder if recompress_builder is not None else default_builder(settings, self.db)
            self.recompression = RecompressionLoop(self.db, builder=builder, clock=clock)
            self._recompress_runner = RecompressionRunner(self.recompression, interval_s=recompress_interval_s)
        self._http: Any = None

    def _fleet_of(self, device_id: str) -> str | None:
        info = self.service.directory.get(device_id)
        return info.fleet if info is not None else None

    def start(self, *, metrics_server: bool = True, connect_timeout: float = 10.0) -> None:
        self.service.start()
        if self.blocks is not None:
            self.blocks.start()
        try:
            if metrics_server:  # first: a port taken by another process must fail before anything touches MQTT
                self._http = self._metrics_server()
            self.mqtt.connect(timeout=connect_timeout)
            if self.rollouts is not None:
                self.rollouts.start()
            if self._recompress_runner is not None:
                self._recompress_runner.start()
        except BaseException:
            self.stop()
            raise
        log.info("controller serving fleet %s", self.settings.fleet)
        log.info("%s", self.recompression_status())

    def _metrics_server(self) -> Any:
        host, port = self.settings.metrics_host, self.settings.metrics_port
        try:
            return start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ControllerError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): another process holds the port; "
                "stop it or choose another with --metrics-port"
            ) from exc

    def recompression_status(self) -> str:
        """The startup line: whether the recompression loop runs, how often, and which class policies it watches."""
        runner, loop = self._recompress_runner, self.recompression
        if runner is None or loop is None:
            return "recompression loop off"
        try:
            policies = loop.describe_policies()
        except ControllerError as exc:
            policies = f"unknown ({exc})"
        key_path = self.settings.key_path
        key = "" if key_path.exists() else f"; no signing key at {key_path}, builds will fail"
        return f"recompression loop every {runner.interval_s:g} s; policies: {policies}{key}"

    def stop(self) -> None:
        if self._recompress_runner is not None:
            self._recompress_runner.stop()
        if self.rollouts is not None:
            self.rollouts.stop()
        if self.blocks is not None:
            self.blocks.stop()
        self.mqtt.close()
        self.service.stop()
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
        self.db.dispose()
