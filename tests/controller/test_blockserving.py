"""The controller serving artifact blocks over a real broker: a device asks, gets every block, bytes are counted."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from waiting import wait_for

from edgefleet.controller.app import ControllerApp
from edgefleet.controller.config import load_settings
from edgefleet.controller.mosquitto import free_port
from edgefleet.protocols.blocks import Bitmap, BlockRequest, decode_block
from edgefleet.protocols.codec import encode
from edgefleet.protocols.topics import artifact_blocks_topic, block_request_topic

pytestmark = pytest.mark.mqtt


def _device(host: str, port: int, client_id: str, topic: str, got: dict[int, bytes]) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)

    def on_message(c: paho.Client, u: object, message: paho.MQTTMessage) -> None:
        block = decode_block(bytes(message.payload))
        got[block.index] = bytes(block.payload)

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect(host, port)
    client.subscribe(topic, qos=0)
    client.loop_start()
    assert subscribed.wait(10), f"the broker did not acknowledge the subscription to {topic}"
    return client


@pytest.fixture
def fleet_home(cli, mqtt_broker, profiles: Path, onnx_factory) -> tuple[object, str]:
    fleet = f"b{uuid.uuid4().hex[:10]}"
    cli.env.update(
        {
            "EDGEFLEET_FLEET": fleet,
            "EDGEFLEET_MQTT_HOST": mqtt_broker.host,
            "EDGEFLEET_MQTT_PORT": str(mqtt_broker.port),
            "EDGEFLEET_MQTT_CLIENT_ID": f"ctl-{fleet}",
        }
    )
    cli.ok("init")
    cli.ok("class", "add", "cortex-a53", "--profile", str(profiles / "cortex-a53.toml"))
    cli.ok("device", "register", "--class", "cortex-a53", "--id", "node-1")
    # 40 inputs x 400 outputs of float32: about 64 KB, eight 8 KiB blocks of the class
    model = onnx_factory(cli.home / "wide.onnx", inputs=40, outputs=400)
    cli.ok("model", "add", "wide", "--onnx", str(model))
    cli.ok("artifact", "add", "wide", "--class", "cortex-a53")
    return cli, fleet


def test_a_requesting_device_gets_every_block_and_the_bytes_are_counted(fleet_home, mqtt_broker) -> None:
    cli, fleet = fleet_home
    shown = cli.json("artifact", "show", "cortex-a53:1")  # type: ignore[attr-defined]
    digest, count = shown["sha256"], shown["blocks"]
    assert count > 1
    settings = load_settings(flags={"home": cli.home}, env=cli.env)  # type: ignore[attr-defined]
    app = ControllerApp(dataclasses.replace(settings, metrics_port=free_port()))
    app.start(metrics_server=False)
    got: dict[int, bytes] = {}
    device = _device(mqtt_broker.host, mqtt_broker.port, f"node-1-{fleet}", artifact_blocks_topic(fleet, digest), got)
    try:
        request = BlockRequest.for_missing(digest, Bitmap(count))
        device.publish(block_request_topic(fleet, "node-1"), encode(request), qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(got) == count, timeout=15), f"got {len(got)} of {count} blocks"
        data = b"".join(got[i] for i in range(count))
        assert hashlib.sha256(data).hexdigest() == digest
        served = app.registry.get_sample_value("edgefleet_artifact_bytes_served_total", {"device_class": "cortex-a53"})
        assert app.blocks is not None
        assert served == app.blocks.server.stats.bytes_sent
        assert served is not None
        assert served >= len(data)
        assert app.blocks.server.stats.blocks_sent == count
    finally:
        device.loop_stop()
        device.disconnect()
        app.stop()


def test_a_request_for_an_unknown_artifact_sends_nothing(fleet_home, mqtt_broker) -> None:
    cli, fleet = fleet_home
    settings = load_settings(flags={"home": cli.home}, env=cli.env)  # type: ignore[attr-defined]
    app = ControllerApp(dataclasses.replace(settings, metrics_port=free_port()))
    app.start(metrics_server=False)
    unknown = "ab" * 32
    got: dict[int, bytes] = {}
    device = _device(mqtt_broker.host, mqtt_broker.port, f"node-1-{fleet}", artifact_blocks_topic(fleet, unknown), got)
    try:
        request = BlockRequest.for_missing(unknown, Bitmap(3))
        device.publish(block_request_topic(fleet, "node-1"), encode(request), qos=1).wait_for_publish(5)
        assert app.blocks is not None
        assert wait_for(lambda: app.blocks is not None and app.blocks.server.stats.unknown_artifacts == 1)
        time.sleep(0.3)
        assert got == {}
        served = app.registry.get_sample_value("edgefleet_artifact_bytes_served_total", {"device_class": "cortex-a53"})
        assert served in {None, 0.0}
        accepted = app.registry.get_sample_value("edgefleet_messages_accepted_total", {"kind": "block_request"})
        assert accepted == 1
    finally:
        device.loop_stop()
        device.disconnect()
        app.stop()
