"""Shared fixtures: a real Mosquitto broker and a real PostgreSQL where one answers.

The MQTT broker, in order of preference:
1. `EDGEFLEET_TEST_MQTT=host:port` when set;
2. the broker answering on 127.0.0.1:1883 (these machines start one);
3. a Mosquitto that the tests start themselves on a free port (`ManagedMosquitto`);
4. otherwise the MQTT tests skip, saying why. They never pass silently.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.controller.broker.mosquitto import ManagedMosquitto, find_mosquitto, port_answers
from edgefleet.controller.errors import BrokerError

# Helper modules shared by several test folders (e.g. waiting.py) live in tests/ itself; there is no package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

POSTGRES_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    managed: ManagedMosquitto | None = None


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real MQTT broker for the whole session."""
    configured = os.environ.get("EDGEFLEET_TEST_MQTT")
    if configured:
        host, _, port = configured.rpartition(":")
        if not port_answers(host, int(port)):
            pytest.fail(f"EDGEFLEET_TEST_MQTT={configured} does not answer")
        yield Broker(host, int(port))
        return
    if port_answers("127.0.0.1", 1883):
        yield Broker("127.0.0.1", 1883)
        return
    if find_mosquitto() is None:
        pytest.skip(
            "no MQTT broker: nothing answers on 127.0.0.1:1883 and the mosquitto binary is missing "
            "(install Debian's `mosquitto` package or set EDGEFLEET_TEST_MQTT=host:port)"
        )
    managed = ManagedMosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        managed.start()
    except BrokerError as exc:
        pytest.skip(f"could not start a managed mosquitto: {exc}")
    try:
        yield Broker(managed.host, managed.port, managed)
    finally:
        managed.stop()


@pytest.fixture
def managed_broker(tmp_path: Path) -> Iterator[ManagedMosquitto]:
    """A broker of the test's own, for tests that restart it or need its config (ACLs, faults)."""
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is missing: install Debian's `mosquitto` package")
    broker = ManagedMosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def postgres_answers() -> bool:
    return port_answers("127.0.0.1", 5432)
