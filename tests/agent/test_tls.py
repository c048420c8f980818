"""MQTT over TLS on the device side, against a real Mosquitto with a TLS listener (certificates made per test).

The broker has two listeners: TLS (the devices'), and a plaintext one on another port for agentkit's test-only
controller side, so the agent's TLS link is what is under test. Covered: a deploy over mutual TLS, a device
trusting the wrong CA (refused, says why, keeps retrying), a device without the certificate the broker requires,
a plaintext client on the TLS port, missing or broken TLS files (clear errors at start), the CLI options, and the
simulator running devices over TLS.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentkit import FLEET, PROFILE, Fleet, Keys, agent_config, build_manifest, fleet_on, tiny_model
from tlskit import Certs, make_certs

from edgefleet.agent.agent import Agent
from edgefleet.agent.cli import main
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.errors import AgentError
from edgefleet.agent.mqtt import MqttLink
from edgefleet.agent.reactor import Reactor
from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
from edgefleet.agent.tls import client_tls_context
from edgefleet.controller.broker.mosquitto import ManagedMosquitto, TlsListener, find_mosquitto, free_port
from edgefleet.controller.errors import BrokerError

pytestmark = pytest.mark.mqtt


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


def _tls_broker(tmp_path: Path, certs: Certs, *, require_certificate: bool) -> Iterator[tuple[ManagedMosquitto, int]]:
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is missing: install Debian's `mosquitto` package")
    plain = free_port()
    broker = ManagedMosquitto(
        tmp_path / "mosquitto",
        tls=certs.listener(require_certificate=require_certificate),
        extra_config=[f"listener {plain} 127.0.0.1"],  # for the plaintext test-only controller side
    )
    broker.start()
    try:
        yield broker, plain
    finally:
        broker.stop()


@pytest.fixture
def mutual_broker(tmp_path: Path, certs: Certs) -> Iterator[tuple[ManagedMosquitto, int]]:
    """TLS listener that requires a client certificate, plus a plaintext listener for the test controller."""
    yield from _tls_broker(tmp_path, certs, require_certificate=True)


@pytest.fixture
def tls_broker(tmp_path: Path, certs: Certs) -> Iterator[tuple[ManagedMosquitto, int]]:
    yield from _tls_broker(tmp_path, certs, require_certificate=False)


@pytest.fixture
def tls_fleet(tmp_path: Path, mutual_broker: tuple[ManagedMosquitto, int], keys: Keys) -> Iterator[Fleet]:
    _, plain = mutual_broker
    with fleet_on(tmp_path, "127.0.0.1", plain, keys) as fleet:
        yield fleet


def _device() -> str:
    return f"tls-{uuid.uuid4().hex[:8]}"


def test_a_device_takes_a_deploy_over_mutual_tls(
    tls_fleet: Fleet, mutual_broker: tuple[ManagedMosquitto, int], certs: Certs, keys: Keys, tmp_path: Path
) -> None:
    broker, _ = mutual_broker
    device = _device()
    # several blocks, so the download crosses TLS records and the read-ahead's buffered bytes
    model = tiny_model(1, pad_bytes=5 * PROFILE.block_size_bytes)
    tls_fleet.controller.offer(model, tmp_path)
    config = agent_config(
        tmp_path, device, "127.0.0.1", broker.port, keys,
        tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key,
    )  # fmt: skip
    agent = Agent(config, reactor=tls_fleet.reactor)
    agent.start()
    tls_fleet.agents[device] = agent  # stopped and closed by fleet_on
    assert tls_fleet.run_until(lambda: agent.link.connected, 10), agent.link.last_error
    assert agent.link.tls
    sock = agent.link._sock
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # still set under TLS
    tls_fleet.reactor.run(timeout=0.1)
    tls_fleet.controller.deploy(device, build_manifest(model, version=1, keys=keys), job_id="j-tls")
    event = tls_fleet.controller.wait_final(device, "j-tls")
    assert event.state.value == "active", event


def _run_refused(reactor: Reactor, link: MqttLink, seconds: float) -> None:
    link.connect()
    reactor.run(timeout=seconds)
    assert not link.connected


def test_a_device_trusting_the_wrong_ca_is_refused_and_keeps_retrying(
    tls_broker: tuple[ManagedMosquitto, int], certs: Certs, keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker, _ = tls_broker
    reactor = Reactor()
    config = agent_config(tmp_path, _device(), "127.0.0.1", broker.port, keys, tls_ca=certs.other_ca)
    agent = Agent(config, reactor=reactor)
    try:
        with caplog.at_level(logging.WARNING, logger="edgefleet.agent.mqtt"):
            agent.start()
            reactor.run(timeout=2.5)
        assert not agent.link.connected
        assert agent.link.last_error is not None
        assert "certificate was refused" in agent.link.last_error, agent.link.last_error
        refusals = [r for r in caplog.records if "TLS connection" in r.getMessage()]
        assert len(refusals) >= 2, "refused once, then retried with back-off"
        assert len(refusals) < 40, "back-off, not a busy loop"
    finally:
        agent.link.close()
        reactor.close()


def test_a_device_without_the_required_client_certificate_is_refused(
    mutual_broker: tuple[ManagedMosquitto, int], certs: Certs
) -> None:
    broker, _ = mutual_broker
    reactor = Reactor()
    link = MqttLink(
        reactor,
        client_id=_device(),
        host="127.0.0.1",
        port=broker.port,
        on_message=lambda _t, _p: None,
        tls=client_tls_context(certs.ca),
    )
    try:
        _run_refused(reactor, link, 1.5)
        assert link.last_error is not None
        assert "certificate" in link.last_error, link.last_error
    finally:
        link.close()
        reactor.close()


def test_a_plaintext_client_on_the_tls_port_never_connects(tls_broker: tuple[ManagedMosquitto, int]) -> None:
    broker, _ = tls_broker
    reactor = Reactor()
    link = MqttLink(reactor, client_id=_device(), host="127.0.0.1", port=broker.port, on_message=lambda _t, _p: None)
    try:
        _run_refused(reactor, link, 1.5)
    finally:
        link.close()
        reactor.close()


def test_a_tls_device_on_a_plaintext_port_says_so(tls_broker: tuple[ManagedMosquitto, int], certs: Certs) -> None:
    _, plain = tls_broker
    reactor = Reactor()
    link = MqttLink(
        reactor,
        client_id=_device(),
        host="127.0.0.1",
        port=plain,
        on_message=lambda _t, _p: None,
        tls=client_tls_context(certs.ca),
    )
    try:
        _run_refused(reactor, link, 1.0)
        assert link.last_error is not None
        assert "plaintext" in link.last_error, link.last_error
    finally:
        link.close()
        reactor.close()


def test_missing_or_broken_tls_files_are_clear_errors_at_start(certs: Certs, keys: Keys, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    config = agent_config(tmp_path, "d1", "127.0.0.1", 1, keys, tls_ca=missing)
    reactor = Reactor()
    try:
        with pytest.raises(AgentError, match=r"CA file .*nope\.pem cannot be read"):
            Agent(config, reactor=reactor)
    finally:
        reactor.close()
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(AgentError, match="no valid PEM certificate"):
        client_tls_context(garbage)
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(AgentError, match="CA file"):
        client_tls_context(empty)
    with pytest.raises(AgentError, match="CA file"):
        client_tls_context(tmp_path)  # a directory
    with pytest.raises(AgentError, match="not a valid PEM pair"):
        client_tls_context(certs.ca, certs.client_cert, certs.server_key)  # someone else's key
    with pytest.raises(AgentError, match="cannot be read"):
        client_tls_context(certs.ca, certs.client_cert, missing)
    # an encrypted key: a clear error, never OpenSSL's passphrase prompt (a service would hang at start)
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_pem_private_key(certs.client_key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(AgentError, match="not a valid PEM pair"):
        client_tls_context(certs.ca, certs.client_cert, locked)
    with pytest.raises(AgentError, match="needs a CA file"):
        AgentConfig(fleet=FLEET, device_id="d2", profile=PROFILE, data_dir=tmp_path, tls_cert=certs.client_cert)
    with pytest.raises(AgentError, match="needs its certificate"):
        AgentConfig(fleet=FLEET, device_id="d3", profile=PROFILE, data_dir=tmp_path, tls_ca=certs.ca, tls_key=missing)


def test_the_agent_cli_reports_a_missing_ca_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], certs: Certs
) -> None:
    missing = str(tmp_path / "missing-ca.pem")
    common = ["--class", "deploy/profiles/rpi4.toml", "--port", "1", "--tls-ca", missing]
    assert main(["run", *common, "--device", "d1", "--data-dir", str(tmp_path / "d"), "--duration", "0.1"]) == 1
    assert "missing-ca.pem cannot be read" in capsys.readouterr().err
    assert main(["simulate", *common, "--devices", "2", "--data-dir", str(tmp_path / "s"), "--duration", "0.1"]) == 1
    assert "missing-ca.pem cannot be read" in capsys.readouterr().err
    args = ["run", "--class", "deploy/profiles/rpi4.toml", "--device", "d1", "--tls-key", str(certs.client_key)]
    assert main([*args, "--data-dir", str(tmp_path / "d"), "--duration", "0.1"]) == 1
    assert "needs a CA file" in capsys.readouterr().err


def test_the_simulator_runs_devices_over_tls(
    tls_broker: tuple[ManagedMosquitto, int], certs: Certs, tmp_path: Path
) -> None:
    broker, _ = tls_broker
    spec = SimulatorSpec(
        devices=4,
        profile=PROFILE,
        data_root=tmp_path / "sim",
        fleet=FLEET,
        port=broker.port,
        id_prefix=_device(),
        tls_ca=certs.ca,
        tls_cert=certs.client_cert,
        tls_key=certs.client_key,
    )
    sim = FleetSimulator(spec)
    try:
        sim.start()
        assert sim.run(until=lambda: sim.connected == 4, duration=15), sim.summary()
        assert all(agent.link.tls for agent in sim.agents)
    finally:
        sim.stop()
    with pytest.raises(AgentError, match="cannot be read"):
        FleetSimulator(SimulatorSpec(devices=1, profile=PROFILE, data_root=tmp_path, tls_ca=tmp_path / "x.pem"))


def test_the_tls_listener_config(tmp_path: Path, certs: Certs) -> None:
    broker = ManagedMosquitto(tmp_path / "m", port=8883, tls=certs.listener(require_certificate=True))
    text = broker.write_config().read_text(encoding="utf-8").splitlines()
    at = text.index("listener 8883 127.0.0.1")
    assert text[at + 1 : at + 6] == [
        f"cafile {certs.ca}",
        f"certfile {certs.server_cert}",
        f"keyfile {certs.server_key}",
        "tls_version tlsv1.2",
        "require_certificate true",
    ]
    hostile = TlsListener(ca=Path("ca.pem\nallow_anonymous true"), cert=certs.server_cert, key=certs.server_key)
    with pytest.raises(BrokerError, match="line break"):
        ManagedMosquitto(tmp_path / "h", tls=hostile).write_config()
