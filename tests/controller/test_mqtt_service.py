"""The controller against a real broker: handlers fed by real publishes, the metrics endpoint, deploys, sessions."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from waiting import wait_for

from edgefleet.controller.artifacts.keys import load_signing_key, public_raw
from edgefleet.controller.broker.mosquitto import free_port
from edgefleet.controller.config import load_settings
from edgefleet.controller.service.app import ControllerApp
from edgefleet.protocols.codec import decode_command
from edgefleet.protocols.commands import DeployCommand
from edgefleet.protocols.signing import key_id, verify_manifest
from edgefleet.protocols.topics import birth_topic, command_topic, telemetry_topic

pytestmark = pytest.mark.mqtt


@dataclasses.dataclass
class Setup:
    cli: object
    fleet: str
    port: int
    host: str


@pytest.fixture
def setup(cli, mqtt_broker, profiles: Path) -> Setup:
    fleet = f"t{uuid.uuid4().hex[:10]}"
    cli.env.update(
        {
            "EDGEFLEET_FLEET": fleet,
            "EDGEFLEET_MQTT_HOST": mqtt_broker.host,
            "EDGEFLEET_MQTT_PORT": str(mqtt_broker.port),
            "EDGEFLEET_MQTT_CLIENT_ID": f"ctl-{fleet}",
        }
    )
    cli.ok("init")
    cli.ok("class", "add", "rpi4", "--profile", str(profiles / "rpi4.toml"))
    cli.ok("device", "register", "--class", "rpi4", "--id", "pi-1", "--id", "pi-2")
    return Setup(cli, fleet, mqtt_broker.port, mqtt_broker.host)


def make_app(setup: Setup, **overrides: object) -> ControllerApp:
    settings = load_settings(flags={"home": setup.cli.home}, env=setup.cli.env)  # type: ignore[attr-defined]
    settings = dataclasses.replace(settings, metrics_port=free_port(), flush_interval_s=0.1, **overrides)
    return ControllerApp(settings)


def publisher(setup: Setup, client_id: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(setup.host, setup.port)
    client.loop_start()
    return client


@pytest.fixture
def running(setup: Setup) -> Iterator[ControllerApp]:
    app = make_app(setup)
    app.start()
    try:
        yield app
    finally:
        app.stop()


def test_published_messages_reach_handlers_metrics_and_registry(setup: Setup, running: ControllerApp, wire) -> None:
    device = publisher(setup, f"pi-1-{setup.fleet}")
    device.publish(birth_topic(setup.fleet, "pi-1"), wire.birth(fleet=setup.fleet, version=1), qos=1)
    for seq in range(20):
        device.publish(telemetry_topic(setup.fleet, "pi-1"), wire.telemetry(seq, latencies=(0.002,)), qos=1)
    device.publish(telemetry_topic(setup.fleet, "pi-1"), b"garbage", qos=1)
    device.publish(telemetry_topic(setup.fleet, "nobody"), wire.telemetry(0), qos=1).wait_for_publish(5)
    labels = {"device_class": "rpi4", "model": "tiny", "model_version": "1"}
    value = running.registry.get_sample_value
    assert wait_for(lambda: value("edgefleet_inference_latency_seconds_count", labels) == 20)
    assert wait_for(lambda: value("edgefleet_messages_rejected_total", {"kind": "telemetry", "reason": "decode"}) == 1)
    assert wait_for(lambda: (value("edgefleet_messages_rejected_total",
                                   {"kind": "telemetry", "reason": "unknown_device"}) or 0) == 1)  # fmt: skip
    assert wait_for(lambda: running.service.rollups.recorded_messages == 20)
    assert value("edgefleet_devices", {"device_class": "rpi4", "state": "online"}) == 1
    body = urllib.request.urlopen(f"http://127.0.0.1:{running.settings.metrics_port}/metrics", timeout=5).read()
    assert b"edgefleet_inference_latency_seconds_bucket" in body
    shown = setup.cli.json("device", "show", "pi-1")  # type: ignore[attr-defined]
    assert shown["state"] == "online"
    assert shown["last_window"]["messages"] == 20
    device.loop_stop()
    device.disconnect()


def test_deploy_publishes_a_signed_command_to_the_device(setup: Setup, tiny_onnx: Path) -> None:
    cli = setup.cli
    cli.ok("model", "add", "tiny", "--onnx", str(tiny_onnx))  # type: ignore[attr-defined]
    cli.ok("artifact", "add", "tiny", "--class", "rpi4")  # type: ignore[attr-defined]
    received: list[bytes] = []
    device = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pi-2-{setup.fleet}", protocol=MQTTProtocolVersion.MQTTv5
    )
    device.on_message = lambda c, u, m: received.append(m.payload)
    device.connect(setup.host, setup.port)
    device.subscribe(command_topic(setup.fleet, "pi-2"), qos=1)
    device.loop_start()
    time.sleep(0.3)
    jobs = cli.json("deploy", "rpi4:1", "--device", "pi-2")  # type: ignore[attr-defined]
    assert [j["state"] for j in jobs] == ["sent"]
    assert wait_for(lambda: len(received) == 1)
    command = decode_command(received[0])
    assert isinstance(command, DeployCommand)
    assert command.job_id == jobs[0]["job"]
    public = public_raw(load_signing_key(cli.home / "keys" / "controller.ed25519"))  # type: ignore[attr-defined]
    manifest = verify_manifest(
        command.manifest, trusted_keys={key_id(public): public}, now=command.issued_at, current_version=None
    )
    assert manifest.version == 1
    assert manifest.device_class == "rpi4"
    shown = cli.json("device", "show", "pi-2")  # type: ignore[attr-defined]
    assert shown["jobs"][0]["state"] == "sent"
    both = cli.json("deploy", "rpi4:1", "--class", "rpi4")  # type: ignore[attr-defined]
    assert sorted(j["device"] for j in both) == ["pi-1", "pi-2"]
    assert wait_for(lambda: len(received) == 2)
    result = cli("deploy", "rpi4:1", "--device", "ghost")  # type: ignore[operator]
    assert result.exit_code == 1
    assert "not registered" in result.output
    device.loop_stop()
    device.disconnect()


def test_messages_sent_while_the_controller_is_away_arrive_after_restart(setup: Setup, wire) -> None:
    first = make_app(setup)
    first.start()
    first.stop()
    device = publisher(setup, f"pi-1b-{setup.fleet}")
    for seq in range(5):
        device.publish(telemetry_topic(setup.fleet, "pi-1"), wire.telemetry(seq), qos=1).wait_for_publish(5)
    device.loop_stop()
    device.disconnect()
    second = make_app(setup)
    second.start()
    try:
        assert wait_for(lambda: second.service.rollups.recorded_messages == 5)
    finally:
        second.stop()


def test_the_controller_reconnects_after_a_broker_restart(cli, managed_broker, profiles: Path, wire) -> None:
    fleet = f"r{uuid.uuid4().hex[:10]}"
    cli.env.update({"EDGEFLEET_FLEET": fleet, "EDGEFLEET_MQTT_PORT": str(managed_broker.port)})
    cli.ok("init")
    cli.ok("class", "add", "rpi4", "--profile", str(profiles / "rpi4.toml"))
    cli.ok("device", "register", "--class", "rpi4", "--id", "pi-1")
    setup = Setup(cli, fleet, managed_broker.port, managed_broker.host)
    app = make_app(setup)
    app.start(metrics_server=False)
    try:
        managed_broker.restart()
        assert wait_for(lambda: app.mqtt.connected, timeout=15)
        device = publisher(setup, "pi-1-after-restart")
        for seq in range(3):
            device.publish(telemetry_topic(fleet, "pi-1"), wire.telemetry(seq), qos=1).wait_for_publish(5)
        assert wait_for(lambda: app.service.rollups.recorded_messages == 3)
        device.loop_stop()
        device.disconnect()
    finally:
        app.stop()


def test_a_killed_agent_is_seen_offline(setup: Setup, running: ControllerApp, profiles: Path, tmp_path: Path) -> None:
    """kill -9 of a real `edgefleet-agent run`: the broker sends its last will, and the controller applies it (the
    will used to be stamped before the online status of the same connection, so every will was ignored)."""
    import os
    import signal
    import subprocess
    import sys

    agent = Path(sys.executable).with_name("edgefleet-agent")
    args = [str(agent), "run", "--device", "pi-1", "--class", str(profiles / "rpi4.toml"), "--fleet", setup.fleet]
    args += ["--host", setup.host, "--port", str(setup.port), "--data-dir", str(tmp_path / "pi-1")]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def state() -> str:
            return str(setup.cli.json("device", "show", "pi-1")["state"])  # type: ignore[attr-defined]

        assert wait_for(lambda: state() == "online", timeout=30, step=0.3)
        time.sleep(1.5)  # the birth and the online status are in: a will must still count after them
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        assert wait_for(lambda: state() == "offline", timeout=20, step=0.3), "the last will was ignored"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
