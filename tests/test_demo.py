"""`edgefleet demo` end to end: a real Mosquitto, the controller, two simulated classes, compression, deploy, telemetry.

The two full runs are `slow` (about a minute each on two busy cores) and bounded by a subprocess timeout. The demo's
broker is the secured one of `edgefleet broker config`: the devices log in with the passwords it kept per class.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.cli import build_parser
from edgefleet.agent.credentials import read_credentials
from edgefleet.controller.config import Settings
from edgefleet.controller.credentials import verify_secret
from edgefleet.controller.demo import default_profiles_dir
from edgefleet.controller.demo_credentials import credentials_path
from edgefleet.controller.demo_fleet import FleetSpec, simulated_ids
from edgefleet.controller.demo_models import fixed_recipe
from edgefleet.controller.demo_report import histogram_quantile
from edgefleet.controller.demo_setup import MANAGED_AUTH, prepare_registry, simulation_profile
from edgefleet.controller.errors import ConfigError
from edgefleet.controller.home import init_home, open_database
from edgefleet.controller.mosquitto import find_mosquitto
from edgefleet.controller.registry import Registry
from edgefleet.protocols.profile import load_profile

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="the mosquitto binary is missing")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): it has exited, only its parent has not collected it
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _anonymous_login(port: int) -> str:
    """What the broker on `port` answers a client that gives no username (the MQTT 5 CONNACK reason)."""
    answered = threading.Event()
    reasons: list[str] = []

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        reasons.append(str(reason))
        answered.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="anonymous-probe", protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        answered.wait(10)
    finally:
        client.loop_stop()
        client.disconnect()
    return reasons[0] if reasons else "no answer"


def test_p95_is_interpolated_within_its_bucket_like_prometheus() -> None:
    buckets = [(0.001, 50.0), (0.002, 90.0), (0.005, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.002 + 0.003 * 0.5)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert histogram_quantile(0.95, [(0.001, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(0.001, 1.0), (float("inf"), 10.0)]) == 0.001  # in +Inf: the last bound


def test_the_fleet_command_is_one_the_agent_accepts(tmp_path: Path) -> None:
    spec = FleetSpec(
        class_name="rpi4",
        profile_path=tmp_path / "rpi4.toml",
        devices=4,
        host="127.0.0.1",
        port=1884,
        fleet="demo",
        trusted_key=tmp_path / "key.pub",
        dataset=tmp_path / "val.npz",
        data_dir=tmp_path / "devices",
        log_path=tmp_path / "sim.log",
        credentials=tmp_path / "rpi4.csv",
    )
    argv = spec.argv()
    verb = argv.index("simulate")
    args = build_parser().parse_args(argv[verb:])
    assert (args.devices, args.port, args.id_prefix, args.infer_fraction) == (4, 1884, "rpi4", 1.0)
    assert args.credentials == tmp_path / "rpi4.csv"
    # a configured broker (`--mqtt-port`): no credentials, the devices connect anonymously as before
    bare = dataclasses.replace(spec, credentials=None).argv()
    assert build_parser().parse_args(bare[verb:]).credentials is None
    # the ids the demo registers are the ones the simulator gives its devices
    assert simulated_ids("rpi4", 2) == ["rpi4-00000", "rpi4-00001"]


def test_simulated_devices_run_one_host_thread_and_keep_the_rest_of_their_profile(tmp_path: Path) -> None:
    for name in ("rpi4", "cortex-a53"):
        source = default_profiles_dir() / f"{name}.toml"
        copy = simulation_profile(source, tmp_path)
        original, simulated = load_profile(source), load_profile(copy)
        assert simulated.threads == 1
        assert simulated.model_dump(exclude={"threads"}) == original.model_dump(exclude={"threads"})


def _prepare(home: Path, devices: int) -> None:
    settings = Settings(home=home, fleet="demo")
    init_home(settings)
    db = open_database(settings)
    try:
        prepare_registry(db, fleet="demo", classes=("rpi4", "cortex-a53"), devices=devices,
                         profiles_dir=default_profiles_dir(), model="digits", home=home,
                         mqtt_host="127.0.0.1", mqtt_port=1884)  # fmt: skip
    finally:
        db.dispose()


def _hashes(home: Path) -> dict[str, str]:
    db = open_database(Settings(home=home, fleet="demo"))
    try:
        return dict(Registry(db, actor="test").broker_accounts())
    finally:
        db.dispose()


def test_a_kept_home_reuses_the_device_passwords_it_kept_and_adds_new_devices(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _prepare(home, 2)
    path = credentials_path(home, "rpi4")
    first = {c.device_id: c.password for c in read_credentials(path, device_class="rpi4")}
    assert list(first) == ["rpi4-00000", "rpi4-00001"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [c.device_id for c in read_credentials(credentials_path(home, "cortex-a53"))] == simulated_ids(
        "cortex-a53", 2
    )

    _prepare(home, 3)  # a second run of the same home, with one more device per class
    second = {c.device_id: c.password for c in read_credentials(path, device_class="rpi4")}
    assert list(second) == simulated_ids("rpi4", 3)
    assert {k: second[k] for k in first} == first  # the kept passwords still hold
    hashes = _hashes(home)
    assert all(verify_secret(password, hashes[device]) for device, password in second.items())

    path.unlink()  # passwords are shown once: a home that lost them cannot be reused
    with pytest.raises(ConfigError, match=r"rpi4-00000.*not in .*rpi4\.csv.*fresh --home"):
        _prepare(home, 3)


def test_every_fixed_demo_recipe_is_a_valid_recipe() -> None:
    from edgefleet.compression import parse_recipe

    for name in ("rpi4", "cortex-a53", "x86-gateway"):
        recipe = parse_recipe(fixed_recipe(name))
        assert recipe.passes[0].kind.value == "distill"
    # the 48 KiB partition of cortex-a53 needs int8 on top of the small student
    assert [p.kind.value for p in parse_recipe(fixed_recipe("cortex-a53")).passes] == ["distill", "quantize_static"]


@pytest.mark.slow
@pytest.mark.mqtt
@needs_mosquitto
def test_the_demo_deploys_to_every_device_and_reports_telemetry(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = subprocess.run(
        [str(EDGEFLEET), "demo", "--duration", "12", "--devices", "3", "--compress", "recipe", "--train-epochs", "3",
         "--home", str(home), "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["ok"] is True
    assert summary["problems"] == []
    assert [c["device_class"] for c in summary["classes"]] == ["rpi4", "cortex-a53"]
    for c in summary["classes"]:
        assert c["version"] == 1
        assert c["devices_total"] == 3
        assert c["devices_active"] == 3, c
        assert c["jobs"] == {"active": 3}
        assert c["telemetry_messages"] > 0
        assert c["labelled_samples"] > 0
        assert c["accuracy"] > 0.7  # ten classes: chance is 0.1; a few dozen samples are noisy
        assert c["p95_latency_ms"] > 0
        assert c["bytes_served"] >= c["artifact_bytes"]
    # everything it started is gone, the fleets stopped cleanly
    pids = [int(p) for k in summary["stopped"] for p in re.findall(r"pid (\d+)", k)]
    assert len(pids) == 3
    assert not [p for p in pids if _alive(p)]
    assert [v for k, v in summary["stopped"].items() if k.startswith("fleet")] == [0, 0]
    assert "every device" not in run.stderr  # the verdict is in the JSON; progress went to stderr
    assert "✓ stopped everything the demo started" in run.stderr
    assert (home / "registry.db").exists()
    # the demo's broker was the secured one: per-device passwords and ACLs, anonymous clients refused
    assert summary["broker_auth"] == MANAGED_AUTH
    config = (home / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in config
    assert "password_file" in config
    assert "acl_file" in config
    for name in ("rpi4", "cortex-a53"):
        kept = credentials_path(home, name)
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert [c.device_id for c in read_credentials(kept, device_class=name)] == simulated_ids(name, 3)


@pytest.mark.slow
@pytest.mark.mqtt
@needs_mosquitto
def test_ctrl_c_stops_everything_the_demo_started_and_metrics_are_up_meanwhile(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(EDGEFLEET), "demo", "--devices", "2", "--home", str(tmp_path / "home"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "simulated cortex-a53 fleet" in line:
                break
        pids = [int(p) for line in seen for p in re.findall(r"pid (\d+)", line)]
        assert len(pids) == 3, "".join(seen)  # mosquitto and two fleets
        urls = [u for line in seen for u in re.findall(r"(http://\S+/metrics)", line)]
        assert len(urls) == 1, "".join(seen)
        body = urllib.request.urlopen(urls[0], timeout=5).read().decode()  # noqa: S310 - a local http URL
        assert 'edgefleet_devices{device_class="rpi4"' in body
        ports = [int(p) for line in seen for p in re.findall(r"managed mosquitto on 127\.0\.0\.1:(\d+)", line)]
        assert len(ports) == 1, "".join(seen)
        assert _anonymous_login(ports[0]) == "Not authorized"  # while the devices are logged in with passwords
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "everything the demo started is stopped" in err
    assert not [p for p in pids if _alive(p)]
