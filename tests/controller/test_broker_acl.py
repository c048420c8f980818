"""`edgefleet broker config` really enforces the ACL on a Mosquitto of the test's own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from waiting import wait_for

from edgefleet.controller.broker.mosquitto import ManagedMosquitto, find_mosquitto, free_port, port_answers
from edgefleet.controller.config import CONTROLLER_USERNAME
from edgefleet.protocols.topics import command_topic, controller_filters, telemetry_topic

pytestmark = pytest.mark.mqtt


class Peer:
    """A raw paho client that records what it receives and whether it got in."""

    def __init__(self, port: int, client_id: str, username: str | None, password: str | None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.received: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.received.append((m.topic, m.payload))
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.answered.wait(5)

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if not reason.is_failure:
            self.connected.set()
        self.answered.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _home_with_a_class(cli, profiles: Path) -> int:
    """An initialised home with class rpi4 whose broker port is a free one (returned); skips without mosquitto."""
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is missing: install Debian's `mosquitto` package")
    port = free_port()
    cli.env["EDGEFLEET_MQTT_PORT"] = str(port)
    cli.ok("init")
    cli.ok("class", "add", "rpi4", "--profile", str(profiles / "rpi4.toml"))
    return port


@pytest.fixture
def acl_broker(cli, profiles: Path) -> Iterator[tuple[int, dict[str, str], str]]:
    port = _home_with_a_class(cli, profiles)
    creds = dict(line.split("\t") for line in cli.ok("device", "register", "--class", "rpi4",
                                                      "--id", "dev-a", "--id", "dev-b").splitlines()[1:])  # fmt: skip
    cli.ok("broker", "config")
    secret = (cli.home / "keys" / "mqtt-controller.secret").read_text().strip()
    from edgefleet.controller.broker.config import managed_broker
    from edgefleet.controller.config import load_settings

    broker: ManagedMosquitto = managed_broker(load_settings(flags={"home": cli.home, "mqtt_port": port}))
    broker.start()
    try:
        yield port, creds, secret
    finally:
        broker.stop()


def test_generated_broker_config_enforces_the_acl(acl_broker) -> None:
    port, creds, secret = acl_broker
    controller = Peer(port, "ctl", CONTROLLER_USERNAME, secret)
    assert controller.connected.is_set()
    for topic in controller_filters("default"):
        controller.client.subscribe(topic, qos=1)
    device_b = Peer(port, "dev-b", "dev-b", creds["dev-b"])
    device_b.client.subscribe(command_topic("default", "dev-b"), qos=1)
    device_a = Peer(port, "dev-a", "dev-a", creds["dev-a"])
    assert device_a.connected.is_set()
    time.sleep(0.3)

    device_a.client.publish(telemetry_topic("default", "dev-a"), b"own", qos=1).wait_for_publish(5)
    device_a.client.publish(telemetry_topic("default", "dev-b"), b"forged", qos=1).wait_for_publish(5)
    device_a.client.publish(command_topic("default", "dev-b"), b"forged command", qos=1).wait_for_publish(5)
    controller.client.publish(command_topic("default", "dev-b"), b"real command", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    assert (telemetry_topic("default", "dev-a"), b"own") in controller.received
    assert all(payload != b"forged" for _, payload in controller.received)
    assert device_b.received == [(command_topic("default", "dev-b"), b"real command")]

    # dev-a may not read dev-b's commands even when it subscribes to them.
    spy = Peer(port, "whatever", "dev-a", creds["dev-a"])
    spy.client.subscribe(command_topic("default", "dev-b"), qos=1)
    time.sleep(0.3)
    controller.client.publish(command_topic("default", "dev-b"), b"second", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    assert spy.received == []
    # use_username_as_clientid: claiming dev-b's client id with dev-a's credentials does not kick dev-b off.
    assert not device_b.disconnected.is_set()
    for peer in (controller, device_a, device_b, spy):
        peer.close()


def test_anonymous_wrong_password_and_unknown_users_are_refused(acl_broker) -> None:
    port, creds, _ = acl_broker
    for username, password in ((None, None), ("dev-a", "wrong"), ("nobody", creds["dev-a"]), ("dev-b", creds["dev-a"])):
        peer = Peer(port, "x", username, password)
        assert peer.answered.is_set()
        assert not peer.connected.is_set(), f"{username} got in"
        peer.close()


def test_simulated_devices_log_in_with_registered_credentials(cli, profiles: Path, tmp_path: Path) -> None:
    """`device register --out` -> `broker config` -> `edgefleet-agent simulate --credentials`, under the real ACL."""
    import subprocess
    import sys

    from edgefleet.controller.broker.config import managed_broker
    from edgefleet.controller.config import load_settings
    from edgefleet.protocols.topics import status_topic

    port = _home_with_a_class(cli, profiles)
    creds_file = tmp_path / "creds.csv"
    cli.ok("device", "register", "--class", "rpi4", "--count", "3", "--prefix", "sim", "--out", str(creds_file))
    cli.ok("broker", "config")
    secret = (cli.home / "keys" / "mqtt-controller.secret").read_text().strip()
    broker: ManagedMosquitto = managed_broker(load_settings(flags={"home": cli.home, "mqtt_port": port}))
    broker.start()
    try:
        controller = Peer(port, "ctl-watch", CONTROLLER_USERNAME, secret)
        for device in ("sim-0001", "sim-0002", "sim-0003"):
            controller.client.subscribe(status_topic("default", device), qos=1)
        code = "import sys; from edgefleet.agent.cli import main; sys.exit(main())"
        proc = subprocess.run(
            [sys.executable, "-c", code, "simulate", "--credentials", str(creds_file), "--class",
             str(profiles / "rpi4.toml"), "--port", str(port), "--fleet", "default", "--duration", "3",
             "--data-dir", str(tmp_path / "sim")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        time.sleep(0.3)
        controller.close()
    finally:
        broker.stop()
    assert proc.returncode == 0, proc.stderr
    online = {topic.split("/")[-2] for topic, payload in controller.received if b"online" in payload}
    assert online == {"sim-0001", "sim-0002", "sim-0003"}, proc.stdout + proc.stderr


def test_simulate_refuses_a_broken_credentials_file(tmp_path: Path, profiles: Path) -> None:
    from edgefleet.agent.cli import main

    bad = tmp_path / "bad.csv"
    for content in (b"", b"device_id,password\nx,y\n", b"device_id,username,password\nd1,d1,\n", b"\xff\xfe\x00"):
        bad.write_bytes(content)
        assert main(["simulate", "--credentials", str(bad), "--class", str(profiles / "rpi4.toml")]) == 1
    assert main(["simulate", "--credentials", str(tmp_path / "none.csv"), "--class", str(profiles / "rpi4.toml")]) == 1
    assert main(["simulate", "--class", str(profiles / "rpi4.toml")]) == 1


def test_devices_registered_after_broker_run_started_can_connect(cli, profiles: Path, tmp_path: Path) -> None:
    """They were refused ("Not authorized") until mosquitto got SIGHUP, and nothing said so."""
    import json
    import os
    import signal
    import subprocess
    import sys

    port = _home_with_a_class(cli, profiles)
    cli.ok("device", "register", "--class", "rpi4", "--id", "early")
    command = [sys.executable, "-c", "from edgefleet.controller.cli.main import main; main()", "broker", "run"]
    broker = subprocess.Popen(command, env={**os.environ, **cli.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: port_answers("127.0.0.1", port), 15.0), "broker run did not start"
        result = cli("device", "register", "--class", "rpi4", "--id", "late", "--json")
        assert result.exit_code == 0, result.output
        assert "reloaded its passwords and ACLs" in result.output
        password = next(c["password"] for c in json.loads(result.stdout) if c["device_id"] == "late")
        peer = None
        for _ in range(20):  # mosquitto rereads the files on SIGHUP, asynchronously
            peer = Peer(port, "late", "late", password)
            if peer.connected.is_set():
                break
            peer.close()
            time.sleep(0.1)
        assert peer is not None
        assert peer.connected.is_set(), "a device registered after the broker started is refused"
        peer.close()
    finally:
        broker.send_signal(signal.SIGTERM)
        out, _ = broker.communicate(timeout=15)
    assert broker.returncode == 0, out
    assert not (cli.home / "broker" / "mosquitto.pid").exists()
