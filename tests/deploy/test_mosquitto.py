"""deploy/mosquitto run by a real Mosquitto: the lab config, and the TLS config with `edgefleet broker config` files."""

from __future__ import annotations

import csv
import datetime as dt
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from deploykit import DEPLOY, listen_port
from livekit import wait_for
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from typer.testing import CliRunner

from edgefleet.controller.broker.mosquitto import find_mosquitto, port_answers
from edgefleet.controller.cli.main import app as cli_app

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def mosquitto() -> str:
    found = find_mosquitto()
    if found is None:
        pytest.skip("the mosquitto binary is missing: install Debian's `mosquitto` package (make services does)")
    return found


def run_broker(binary: str, config: str, workdir: Path, port: int) -> Iterator[None]:
    if os.geteuid() == 0:
        # As root, Mosquitto would drop to the `mosquitto` user, who cannot read the temporary files.
        config = "user root\n" + config
    path = workdir / "mosquitto.conf"
    path.write_text(config, encoding="utf-8")
    log = (workdir / "broker.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: port_answers("127.0.0.1", port) or proc.poll() is not None, timeout=10)
        assert proc.poll() is None, (workdir / "broker.log").read_text(errors="replace")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def connect(port: int, *, username: str | None = None, password: str | None = None, ca: Path | None = None) -> bool:
    """True when the broker accepts the connection (CONNACK success)."""
    outcome: list[bool] = []
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=username or "", protocol=MQTTProtocolVersion.MQTTv5)

    def on_connect(c: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        outcome.append(not reason.is_failure)  # type: ignore[attr-defined]
        done.set()

    client.on_connect = on_connect
    if username is not None:
        client.username_pw_set(username, password)
    if ca is not None:
        client.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return False
    client.loop_start()
    try:
        done.wait(10)
        return outcome == [True]
    finally:
        client.loop_stop()
        client.disconnect()


def test_the_lab_config_runs_and_accepts_the_simulated_fleet(mosquitto: str, tmp_path: Path) -> None:
    port = listen_port()
    config = (
        (DEPLOY / "mosquitto" / "lab.conf")
        .read_text(encoding="utf-8")
        .replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
        .replace("/mosquitto/data/", f"{tmp_path}/")
        .replace("log_dest stdout", f"log_dest file {tmp_path / 'mosquitto.log'}")
    )
    for _ in run_broker(mosquitto, config, tmp_path, port):
        assert connect(port)


def certificates(folder: Path) -> Path:
    """A private CA and a server certificate for 127.0.0.1, as the openssl commands in docs/operations.md make."""
    folder.mkdir()
    now = dt.datetime.now(dt.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.crt").write_bytes(server.public_bytes(pem))
    (folder / "server.key").write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder


def test_the_tls_config_serves_the_devices_broker_config_wrote(mosquitto: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"EDGEFLEET_HOME": str(home)}
    runner = CliRunner()
    for args in (
        ["init"],
        ["class", "add", "rpi4", "--profile", str(DEPLOY / "profiles" / "rpi4.toml")],
        ["device", "register", "--class", "rpi4", "--id", "pi-1", "--out", str(tmp_path / "creds.csv")],
        ["broker", "config"],
    ):
        result = runner.invoke(cli_app, args, env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    with (tmp_path / "creds.csv").open(encoding="utf-8") as handle:
        password = next(csv.DictReader(handle))["password"]
    certs = certificates(tmp_path / "certs")
    tls_port, plain_port = listen_port(), listen_port()
    config = (
        (DEPLOY / "mosquitto" / "tls.conf")
        .read_text(encoding="utf-8")
        .replace("/var/lib/edgefleet/broker/", f"{home / 'broker'}/")
        .replace("/etc/mosquitto/certs/", f"{certs}/")
        .replace("listener 8883 0.0.0.0", f"listener {tls_port} 127.0.0.1")
        .replace("listener 1883 127.0.0.1", f"listener {plain_port} 127.0.0.1")
        .replace("/var/lib/mosquitto/", f"{tmp_path}/")
        .replace("log_dest syslog", f"log_dest file {tmp_path / 'mosquitto.log'}")
    )
    for _ in run_broker(mosquitto, config, tmp_path, tls_port):
        assert connect(tls_port, username="pi-1", password=password, ca=certs / "ca.crt")
        assert not connect(tls_port, username="pi-1", password="wrong", ca=certs / "ca.crt")
        assert not connect(tls_port, ca=certs / "ca.crt")  # anonymous refused
        assert connect(plain_port, username="pi-1", password=password)
