"""The controller process: registry database, message service, MQTT connection and metrics endpoint together.

`edgefleet serve` and the ingest benchmark both run a `ControllerApp`.

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

from edgefleet.controller.config import Settings
from edgefleet.controller.db import Database
from edgefleet.controller.home import open_database
from edgefleet.controller.metrics import ControllerMetrics
from edgefleet.controller.mqtt import MqttClient
from edgefleet.controller.service import BlockRequestHook, ControllerService
from edgefleet.controller.tables import DeploymentJob, Device, utcnow
from edgefleet.protocols.topics import controller_filters

__all__ = ["ControllerApp", "device_state_counts", "job_state_counts"]

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


class ControllerApp:
    """Wires settings into a running controller; `start()` returns once MQTT is connected."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        db: Database | None = None,
        block_requests: BlockRequestHook | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
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
        )
        self._http: Any = None

    def start(self, *, metrics_server: bool = True, connect_timeout: float = 10.0) -> None:
        self.service.start()
        try:
            self.mqtt.connect(timeout=connect_timeout)
            if metrics_server:
                self._http = start_http_server(
                    self.settings.metrics_port, addr=self.settings.metrics_host, registry=self.registry
                )
        except BaseException:
            self.stop()
            raise
        log.info("controller serving fleet %s", self.settings.fleet)

    def stop(self) -> None:
        self.mqtt.close()
        self.service.stop()
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
        self.db.dispose()
