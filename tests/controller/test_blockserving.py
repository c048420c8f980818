"""The controller serving artifact blocks over a real broker: a device asks, gets every block, bytes are counted;
the in-flight window holds while the broker stalls."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from waiting import wait_for

from edgefleet.controller.broker.mosquitto import free_port
from edgefleet.controller.config import load_settings
from edgefleet.controller.errors import MqttError
from edgefleet.controller.service.app import ControllerApp
from edgefleet.controller.service.blockserver import BlockServer, ServedArtifact
from edgefleet.controller.service.mqtt import MqttClient
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


def _client(host: str, port: int) -> MqttClient:
    client = MqttClient(host=host, port=port, client_id=f"ctl-{uuid.uuid4().hex[:10]}", session_expiry_s=0)
    client.connect(timeout=10)
    return client


def test_tracked_publishes_are_each_reported_done_once(mqtt_broker) -> None:
    client = _client(mqtt_broker.host, mqtt_broker.port)
    done: list[int] = []
    lock = threading.Lock()

    def on_done(mid: int) -> None:
        with lock:
            done.append(mid)

    try:
        mids = [
            client.publish_tracked(f"edgefleet-test/{uuid.uuid4().hex}", b"x" * 100, qos=i % 2, on_done=on_done)
            for i in range(200)
        ]
        assert None not in mids
        assert wait_for(lambda: len(done) == 200, timeout=10), f"{len(done)} of 200 reported"
        time.sleep(0.1)
        assert sorted(done) == sorted(m for m in mids if m is not None), "each one reported once, none twice"
        assert client.tracked == 0
    finally:
        client.close()
    with pytest.raises(MqttError, match="not connected"):
        client.publish_tracked("t", b"x", qos=1, on_done=on_done)


@pytest.mark.parametrize("ack_every", [1, 4])
def test_the_in_flight_window_bounds_unacknowledged_blocks_while_the_broker_stalls(
    managed_broker, tmp_path, ack_every: int
) -> None:
    """A broker that stops answering (SIGSTOP) gets exactly `max_inflight` blocks, the rest once it answers again.

    With `ack_every` 4, three blocks in four go with QoS 0 and count until the next QoS 1 one is acknowledged."""
    data = os.urandom(200 * 4096 - 100)
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / "artifact.bin"
    path.write_bytes(data)
    count, window, fleet = 200, 8, "winfleet"
    client = _client(managed_broker.host, managed_broker.port)

    def publish(topic: str, payload: bytes, qos: int) -> int | None:
        if server.tracks(qos):
            return client.publish_tracked(topic, payload, qos=qos, on_done=server.on_published)
        client.publish(topic, payload, qos=qos, timeout=None)
        return None

    server = BlockServer(
        publish,
        {digest: ServedArtifact(path, 4096)}.get,
        rate_limit_bytes_per_s=None,
        max_inflight=window,
        coalesce_s=0.0,
        qos=1,
        ack_every=ack_every,
    )
    got: dict[int, bytes] = {}
    device = _device(managed_broker.host, managed_broker.port, "slow-dev", artifact_blocks_topic(fleet, digest), got)
    pid = managed_broker.pid
    assert pid is not None
    stopped = False
    try:
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        request = BlockRequest.for_missing(digest, Bitmap(count))
        assert server.handle_request(block_request_topic(fleet, "slow-dev"), encode(request))
        server.start()
        assert wait_for(lambda: server.stats.blocks_sent >= window, timeout=5)
        time.sleep(0.5)  # the broker is frozen: no acknowledgement, so nothing more may go out
        assert server.stats.blocks_sent == window
        assert server.inflight == window
        assert client.tracked == window // ack_every, "one tracked QoS 1 message per ack_every blocks"
        os.kill(pid, signal.SIGCONT)
        stopped = False
        assert wait_for(lambda: len(got) == count, timeout=20), f"got {len(got)} of {count} blocks"
        assert b"".join(got[i] for i in range(count)) == data
        assert wait_for(lambda: server.inflight == 0 and client.tracked == 0, timeout=5)
        assert server.stats.max_inflight_seen == window, "the window was used, and never exceeded"
        assert server.stats.blocks_sent == count
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        server.stop()
        device.loop_stop()
        device.disconnect()
        client.close()


def test_block_serving_never_asks_for_a_window_above_the_client_limit(fleet_home, mqtt_broker) -> None:
    cli, _fleet = fleet_home
    settings = load_settings(flags={"home": cli.home}, env=cli.env)  # type: ignore[attr-defined]
    app = ControllerApp(dataclasses.replace(settings, metrics_port=free_port()), rollouts=False)
    try:
        assert app.blocks is not None
        assert app.blocks.server.qos == 1
        assert 1 <= app.blocks.server.max_inflight <= app.mqtt.max_inflight
    finally:
        app.db.dispose()
    with pytest.raises(ValueError, match="max_inflight"):
        BlockServer(lambda t, p, q: None, {}.get, max_inflight=70_000)
    with pytest.raises(ValueError, match="QoS"):
        BlockServer(lambda t, p, q: None, {}.get, qos=2)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _offline_server(tmp_path: Path, blocks: int, **kwargs: object) -> tuple[BlockServer, list[tuple[int, int]], str]:
    data = os.urandom(blocks * 4096)
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / "artifact.bin"
    path.write_bytes(data)
    sent: list[tuple[int, int]] = []  # (block index, qos)

    def publish(topic: str, payload: bytes, qos: int) -> int | None:
        sent.append((decode_block(payload).index, qos))
        return len(sent) if server.tracks(qos) else None

    server = BlockServer(
        publish,
        {digest: ServedArtifact(path, 4096)}.get,
        rate_limit_bytes_per_s=None,
        coalesce_s=0.0,
        **kwargs,  # type: ignore[arg-type]
    )
    return server, sent, digest


def _ask(server: BlockServer, digest: str, device: str, blocks: list[int], count: int) -> None:
    wanted = Bitmap(count)
    for i in blocks:
        wanted.set(i)
    request = BlockRequest(artifact_sha256=digest, block_count=count, wanted=wanted.to_base64())
    assert server.handle_request(block_request_topic("f", device), encode(request))


def test_a_late_joiner_gets_blocks_sent_before_it_listened_while_early_ones_are_held_back(tmp_path: Path) -> None:
    clock = _Clock()
    server, sent, digest = _offline_server(tmp_path, 6, resend_holdoff_s=3.0, clock=clock, max_inflight=100)
    _ask(server, digest, "early", list(range(6)), 6)
    clock.now = 1.0
    server.pump()
    assert [i for i, _ in sent] == list(range(6))
    clock.now = 1.5
    _ask(server, digest, "early", [0, 1], 6)  # asked again within the holdoff: most likely on its way, held back
    _ask(server, digest, "late", [2, 3], 6)  # first heard of after they went out: it cannot have them
    server.pump()
    assert [i for i, _ in sent[6:]] == [2, 3]
    assert (server.stats.held_back, server.stats.late_resends) == (2, 2)
    clock.now = 5.0  # past the holdoff: the early device really lost them
    _ask(server, digest, "early", [0, 1], 6)
    server.pump()
    assert [i for i, _ in sent[8:]] == [0, 1]


def test_every_kth_block_and_the_last_one_carry_the_acknowledgement(tmp_path: Path) -> None:
    server, sent, digest = _offline_server(tmp_path, 10, qos=1, ack_every=4, max_inflight=100)
    _ask(server, digest, "d", list(range(10)), 10)
    server.pump()
    assert [q for _, q in sent] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 1]
    assert server.inflight == 10
    server.on_published(4)  # the first marker covers blocks 0-3
    assert server.inflight == 6
    server.on_published(8)
    server.on_published(10)
    assert server.inflight == 0
    assert not server.busy
    server.on_published(10)  # a stray or repeated report changes nothing
    assert server.inflight == 0
    with pytest.raises(ValueError, match="ack_every"):
        BlockServer(lambda t, p, q: None, {}.get, qos=1, ack_every=0)
