"""`edgefleet broker run` and `edgefleet serve` as real processes: they start, work, and stop cleanly on SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from waiting import wait_for

from edgefleet.controller.broker.mosquitto import find_mosquitto, free_port, port_answers
from edgefleet.controller.config import load_settings
from edgefleet.controller.service.app import ControllerApp
from edgefleet.protocols.topics import telemetry_topic

pytestmark = pytest.mark.mqtt

EDGEFLEET = [sys.executable, "-c", "from edgefleet.controller.cli.main import main; main()"]


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return proc.returncode, out.decode(errors="replace")


def test_broker_run_and_serve_until_sigterm(ready, tmp_path: Path, wire) -> None:
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is missing: install Debian's `mosquitto` package")
    mqtt_port, metrics_port = free_port(), free_port()
    ready.ok("device", "register", "--class", "rpi4", "--id", "pi-1")
    env = {
        **os.environ,
        **ready.env,
        "EDGEFLEET_MQTT_PORT": str(mqtt_port),
        "EDGEFLEET_METRICS_PORT": str(metrics_port),
    }
    broker = subprocess.Popen([*EDGEFLEET, "broker", "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: port_answers("127.0.0.1", mqtt_port), 15.0), "broker run did not start a broker"
        serve = subprocess.Popen([*EDGEFLEET, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            assert wait_for(lambda: port_answers("127.0.0.1", metrics_port), 15.0), (
                "serve did not open its metrics port"
            )
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            assert 'edgefleet_devices{device_class="rpi4",state="offline"} 1.0' in body
        finally:
            code, out = stop(serve)
        assert code == 0, out
        assert "stopped" in out
        assert "Traceback" not in out
    finally:
        code, out = stop(broker)
    assert code == 0, out
    assert "mosquitto stopped" in out


def test_shared_subscriptions_split_the_stream_between_replicas(cli, mqtt_broker, profiles: Path, wire) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    fleet = f"s{uuid.uuid4().hex[:10]}"
    cli.env.update({"EDGEFLEET_FLEET": fleet, "EDGEFLEET_MQTT_PORT": str(mqtt_broker.port),
                    "EDGEFLEET_SHARED_SUBSCRIPTIONS": "true"})  # fmt: skip
    cli.ok("init")
    cli.ok("class", "add", "rpi4", "--profile", str(profiles / "rpi4.toml"))
    cli.ok("device", "register", "--class", "rpi4", "--count", "4", "--prefix", "pi")
    base = load_settings(flags={"home": cli.home}, env=cli.env)
    apps = [
        ControllerApp(dataclasses.replace(base, mqtt_client_id=f"{fleet}-r{i}", flush_interval_s=0.1)) for i in range(2)
    ]
    for app in apps:
        app.start(metrics_server=False)
    try:
        device = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{fleet}-dev")
        device.connect(mqtt_broker.host, mqtt_broker.port)
        device.loop_start()
        for seq in range(40):
            info = device.publish(telemetry_topic(fleet, f"pi-{seq % 4 + 1:04d}"), wire.telemetry(seq // 4), qos=1)
        info.wait_for_publish(5)
        assert wait_for(lambda: sum(a.service.rollups.recorded_messages for a in apps) == 40, 15.0)
        counts = [a.service.rollups.recorded_messages for a in apps]
        assert all(c > 0 for c in counts), counts
        device.loop_stop()
        device.disconnect()
    finally:
        for app in apps:
            app.stop()


def test_broker_run_on_a_taken_port_fails_with_the_reason(ready, tmp_path: Path) -> None:
    """Port 1883 held by another broker: `broker run` said "mosquitto pid ... on 127.0.0.1:1883", then "mosquitto
    stopped", exit 0, with "Address already in use" only in mosquitto.log."""
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is missing: install Debian's `mosquitto` package")
    import socket

    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    env = {**os.environ, **ready.env, "EDGEFLEET_MQTT_PORT": str(port)}
    try:
        done = subprocess.run(
            [*EDGEFLEET, "broker", "run"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        holder.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"127.0.0.1:{port} is already in use by another process" in done.stderr
    assert "--mqtt-port" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_second_serve_on_the_same_home_refuses_before_touching_mqtt(ready, mqtt_broker, tmp_path: Path) -> None:
    """The second one kicked the first off MQTT (same client id), then died with a raw traceback (metrics port)."""
    metrics_port = free_port()
    env = {**os.environ, **ready.env, "EDGEFLEET_MQTT_PORT": str(mqtt_broker.port),
           "EDGEFLEET_METRICS_PORT": str(metrics_port)}  # fmt: skip
    first = subprocess.Popen([*EDGEFLEET, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: port_answers("127.0.0.1", metrics_port), 15.0), "serve did not start"
        second = subprocess.run([*EDGEFLEET, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1
        assert f"another `edgefleet serve` (pid {first.pid}) is running on the home" in second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        assert first.poll() is None, "the first serve must keep running"
        # Another home, same metrics port: a clear line, not an OSError traceback, and MQTT untouched.
        other = {**env, "EDGEFLEET_HOME": str(tmp_path / "other")}
        init = subprocess.run([*EDGEFLEET, "init"], env=other, capture_output=True, timeout=60, check=False)
        assert init.returncode == 0
        third = subprocess.run(
            [*EDGEFLEET, "serve"], env=other, capture_output=True, text=True, timeout=60, check=False
        )
        assert third.returncode == 1
        assert f"cannot serve metrics on 127.0.0.1:{metrics_port}" in third.stderr
        assert "Traceback" not in third.stderr + third.stdout
    finally:
        code, out = stop(first)
    assert code == 0, out
