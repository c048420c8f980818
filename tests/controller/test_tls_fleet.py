"""MQTT over TLS on the controller side: settings, `broker config`, and a whole rollout over TLS.

The end-to-end test is the product as an operator sets it up: `broker config --tls-*` writes a TLS listener with
per-device passwords and ACLs, the managed Mosquitto runs it, the controller (`ControllerApp`, as `edgefleet
serve` runs it) connects with `mqtt_tls_ca` and a client certificate, and simulated devices log in over TLS with
their registered passwords and take a rollout. Certificates are made at test time (tests/tlskit.py).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from tlskit import Certs, make_certs
from waiting import wait_for

from edgefleet.agent.credentials import read_credentials
from edgefleet.agent.replay import load_dataset
from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
from edgefleet.controller.artifacts.keys import load_signing_key, public_raw
from edgefleet.controller.broker.config import managed_broker
from edgefleet.controller.broker.mosquitto import ManagedMosquitto, find_mosquitto, free_port
from edgefleet.controller.config import MqttTls, load_settings
from edgefleet.controller.errors import ConfigError, MqttError
from edgefleet.controller.rollout.api import Rollouts
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.controller.rollout.status import describe
from edgefleet.controller.service.app import ControllerApp
from edgefleet.controller.service.mqtt import MqttClient
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.signing import key_id

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
N = 3


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


def test_tls_settings_are_checked_at_load(tmp_path: Path, certs: Certs) -> None:
    home = {"home": tmp_path / "home"}
    settings = load_settings(flags={**home, "mqtt_tls_ca": str(certs.ca)}, env={})
    assert settings.mqtt_tls == MqttTls(certs.ca)
    assert load_settings(flags=home, env={}).mqtt_tls is None  # plaintext stays the default
    env = {"EDGEFLEET_MQTT_TLS_CA": str(certs.ca), "EDGEFLEET_MQTT_TLS_CERT": str(certs.client_cert)}
    assert load_settings(flags=home, env=env).mqtt_tls == MqttTls(certs.ca, certs.client_cert)
    with pytest.raises(ConfigError, match=r"mqtt_tls_ca = .*\(cannot read .*missing\.pem"):
        load_settings(flags={**home, "mqtt_tls_ca": str(tmp_path / "missing.pem")}, env={})
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(flags=home, env={"EDGEFLEET_MQTT_TLS_CA": str(tmp_path)})
    with pytest.raises(ConfigError, match="need mqtt_tls_ca"):
        load_settings(flags={**home, "mqtt_tls_cert": str(certs.client_cert)}, env={})
    with pytest.raises(ConfigError, match="needs mqtt_tls_cert"):
        load_settings(flags={**home, "mqtt_tls_ca": str(certs.ca), "mqtt_tls_key": str(certs.client_key)}, env={})
    with pytest.raises(ConfigError, match="go together"):
        load_settings(flags={**home, "broker_tls_cert": str(certs.server_cert)}, env={})
    with pytest.raises(ConfigError, match="true/false"):
        load_settings(flags={**home, "broker_tls_require_certificate": "maybe"}, env={})
    no_ca = load_settings(
        flags={**home, "broker_tls_cert": str(certs.server_cert), "broker_tls_key": str(certs.server_key)}, env={}
    )
    with pytest.raises(ConfigError, match="needs a CA file"):
        _ = no_ca.broker_tls
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"CA file .*garbage\.pem cannot be used"):
        MqttClient(host="127.0.0.1", port=1, client_id="x", tls=MqttTls(garbage))
    with pytest.raises(ConfigError, match=r"client certificate .* cannot be used"):
        MqttClient(host="127.0.0.1", port=1, client_id="x", tls=MqttTls(certs.ca, certs.client_cert, certs.server_key))


def test_broker_config_writes_a_tls_listener(cli, certs: Certs, tmp_path: Path) -> None:
    cli.ok("init")
    out = cli.json(
        "broker", "config", "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--tls-ca", str(certs.ca), "--require-certificate",
    )  # fmt: skip
    assert out["tls"] is True
    assert out["require_certificate"] is True
    text = Path(out["config"]).read_text(encoding="utf-8")
    for line in (f"cafile {certs.ca}", f"certfile {certs.server_cert}", f"keyfile {certs.server_key}",
                 "require_certificate true", "tls_version tlsv1.2", "allow_anonymous false"):  # fmt: skip
        assert line in text.splitlines(), text
    plain = cli.json("broker", "config")  # without the options: plaintext, as before
    assert plain["tls"] is False
    assert "certfile" not in Path(plain["config"]).read_text(encoding="utf-8")
    # hostile or incomplete options: one clear line, exit 1, no traceback
    bad = cli("broker", "config", "--tls-cert", str(certs.server_cert))
    assert bad.exit_code != 0
    assert "go together" in bad.output
    bad = cli("broker", "config", "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(certs.server_key))
    assert bad.exit_code != 0
    assert "nope.pem" in bad.output
    bad = cli("broker", "config", "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key))
    assert bad.exit_code != 0
    assert "needs a CA file" in bad.output
    cli.env["EDGEFLEET_MQTT_TLS_CA"] = str(tmp_path / "gone.pem")  # `serve` with a missing CA: one line, exit 1
    bad = cli("serve", "--no-recompress")
    assert bad.exit_code != 0
    assert "gone.pem" in bad.output
    assert "Traceback" not in bad.output
    cli.env["EDGEFLEET_MQTT_TLS_CA"] = str(certs.ca)  # the CA from the settings
    assert cli.json("broker", "config", "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key))["tls"]


@pytest.mark.mqtt
def test_the_controller_refuses_a_broker_it_cannot_verify(certs: Certs, tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is missing: install Debian's `mosquitto` package")
    with ManagedMosquitto(tmp_path / "m", tls=certs.listener()) as broker:
        client = MqttClient(host="127.0.0.1", port=broker.port, client_id="tls-wrong-ca", tls=MqttTls(certs.other_ca))
        with pytest.raises(MqttError, match="certificate was refused"):
            client.connect(timeout=10)
        plain = MqttClient(host="127.0.0.1", port=broker.port, client_id="tls-plain", session_expiry_s=0)
        with pytest.raises(MqttError):  # a plaintext client on the TLS port never gets a CONNACK
            plain.connect(timeout=1.5)
        good = MqttClient(host="localhost", port=broker.port, client_id="tls-good", tls=MqttTls(certs.ca))
        good.connect(timeout=10)  # the broker's certificate names localhost too
        sock = good._client.socket() if good._client is not None else None
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # still set under TLS
        assert sock.version() in {"TLSv1.2", "TLSv1.3"}
        good.publish("edgefleet-tls-test/x", b"1", qos=1)
        good.close()


@pytest.mark.mqtt
@pytest.mark.slow
def test_a_rollout_over_tls_with_passwords_and_client_certificates(
    cli, certs: Certs, tmp_path: Path, tiny_onnx: Path
) -> None:
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is missing: install Debian's `mosquitto` package")
    port = free_port()
    cli.env.update(
        {"EDGEFLEET_FLEET": "tlsfleet", "EDGEFLEET_MQTT_PORT": str(port), "EDGEFLEET_MQTT_TLS_CA": str(certs.ca),
         "EDGEFLEET_MQTT_TLS_CERT": str(certs.client_cert), "EDGEFLEET_MQTT_TLS_KEY": str(certs.client_key),
         "EDGEFLEET_BROKER_TLS_CERT": str(certs.server_cert), "EDGEFLEET_BROKER_TLS_KEY": str(certs.server_key),
         "EDGEFLEET_BROKER_TLS_REQUIRE_CERTIFICATE": "true"}
    )  # fmt: skip
    cli.ok("init")
    cli.ok("class", "add", "rpi4", "--profile", str(PROFILES / "rpi4.toml"))
    creds = tmp_path / "rpi4.csv"
    cli.ok("device", "register", "--class", "rpi4", "--count", str(N), "--prefix", "tls", "--out", str(creds))
    cli.ok("model", "add", "tiny", "--onnx", str(tiny_onnx))
    cli.ok("artifact", "add", "tiny", "--class", "rpi4")
    assert cli.json("broker", "config")["tls"] is True
    settings = load_settings(flags={"home": cli.home}, env=cli.env)
    settings = dataclasses.replace(settings, metrics_port=free_port(), flush_interval_s=0.1)
    broker = managed_broker(settings)
    broker.start()
    stop = threading.Event()
    app = ControllerApp(settings, rollout_interval_s=0.2)
    sim: FleetSimulator | None = None
    simulating: threading.Thread | None = None
    try:
        app.start(metrics_server=False)  # connects over TLS with its password and client certificate
        data = tmp_path / "replay.npz"
        rng = np.random.default_rng(0)
        np.savez(data, x=rng.normal(size=(64, 4)).astype(np.float32), y=rng.integers(0, 3, size=64))
        public = public_raw(load_signing_key(settings.key_path))
        rows = read_credentials(creds, device_class="rpi4")
        spec = SimulatorSpec(
            devices=N, device_ids=tuple(r.device_id for r in rows), passwords={r.device_id: r.password for r in rows},
            profile=load_profile(PROFILES / "rpi4.toml"), data_root=tmp_path / "sim", fleet="tlsfleet", port=port,
            tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key,
            trusted_keys={key_id(public): public}, telemetry_window_s=0.5, probation_s=0.2,
            dataset=load_dataset(data), infer_fraction=1.0, infer_rate_hz=40.0,
        )  # fmt: skip
        sim = FleetSimulator(spec)
        simulating = threading.Thread(target=lambda: sim.run(until=stop.is_set) if sim else None)
        sim.start()
        simulating.start()
        assert wait_for(lambda: sim is not None and sim.connected == N, 20)
        gates = GateConfig(
            window_s=60, min_devices=1, min_samples=10, min_labelled=5, max_error_rate=0.5, latency_p95_ms=100.0
        )
        rollouts = Rollouts(app.db)
        rid = rollouts.start("rpi4:1", plan=WavePlan(canary="1", growth=2), gates=gates).id or 0
        assert wait_for(lambda: rollouts.get(rid).state == "completed", 60), json.dumps(describe(app.db, rid))
        assert sim.summary().versions == {1: N}
    finally:
        stop.set()
        if simulating is not None and simulating.is_alive():
            simulating.join(10)
        if sim is not None:
            sim.stop()
        app.stop()
        broker.stop()
