"""The fleet simulator and the command line: many devices on one loop, faults injected, real inference."""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agentkit import FLEET, PROFILE, Fleet, build_manifest, tiny_model

from edgefleet.agent.cli import main
from edgefleet.agent.config import Faults
from edgefleet.agent.replay import load_dataset
from edgefleet.agent.runner import runtime_version
from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
from edgefleet.protocols.codes import ResultCode
from edgefleet.protocols.profile import ReferenceTimes


@pytest.mark.mqtt
def test_simulated_fleet_with_faults_ends_active_and_reports(fleet: Fleet, tmp_path: Path) -> None:
    data = tmp_path / "replay.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(32, 4)).astype(np.float32), y=rng.integers(0, 3, size=32))
    spec = SimulatorSpec(
        devices=12,
        profile=PROFILE,
        data_root=tmp_path / "sim",
        fleet=FLEET,
        host=fleet.host,
        port=fleet.port,
        id_prefix="sim",
        trusted_keys=fleet.keys.trusted,
        telemetry_window_s=0.5,
        probation_s=0.2,
        dataset=load_dataset(data),
        infer_fraction=0.5,
        infer_rate_hz=20.0,
        fault_devices=3,
        faults=Faults(drop_at_fraction=0.5, crash_during_install=True, corrupt_blocks=frozenset({1})),
        restart_after_s=0.2,
    )
    sim = FleetSimulator(spec, reactor=fleet.reactor)
    sim.start()
    assert sim.run(duration=10, until=lambda: sim.connected == 12)
    model = tiny_model(9, pad_bytes=30_000)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=1, keys=fleet.keys)
    for i in range(12):
        fleet.controller.deploy(spec.device_id(i), signed, job_id="job-sim")
    for i in range(12):
        event = fleet.controller.wait_final(spec.device_id(i), "job-sim", timeout=30)
        assert (event.state.value, event.result) == ("active", ResultCode.OK)
    summary = sim.summary()
    assert summary.versions == {1: 12}
    assert summary.crashes == 3
    assert fleet.run_until(lambda: any(b.labelled_count for t in fleet.controller.telemetry.values() for b in t))
    assert sim.inferences > 0
    assert len(sim.sessions) == 1, "simulated devices share one onnxruntime session per model"
    sim.stop()


def test_speed_factor_verb_prints_the_profile_table(capsys: Any) -> None:
    """What a device prints is a TOML table a profile takes as it is."""
    assert main(["speed-factor", "--threads", "1", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "[profile.reference_ms]" in out
    table = tomllib.loads(out)["profile"]["reference_ms"]
    assert ReferenceTimes.model_validate(table).fp32_conv > 0
    assert main(["speed-factor", "--json", "--rounds", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["reference_ms"]) == set(ReferenceTimes.model_fields)
    assert report["threads"] == 1
    assert report["onnxruntime"] == runtime_version()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: Any) -> None:
    assert main(["speed-factor", "--threads", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgefleet-agent speed-factor:")
    assert "Traceback" not in err
    assert main(["simulate", "--class", str(tmp_path / "missing.toml"), "--devices", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgefleet-agent simulate:")
    assert "Traceback" not in err


@pytest.mark.mqtt
def test_simulate_verb_connects_and_summarises(tmp_path: Path, mqtt_broker: Any, capsys: Any) -> None:
    args = ["simulate", "--devices", "5", "--class", str(_box_profile(tmp_path)), "--host", mqtt_broker.host]
    args += ["--port", str(mqtt_broker.port), "--data-dir", str(tmp_path / "sim"), "--duration", "1.5"]
    assert main([*args, "--log-level", "warning"]) == 0
    assert "5 devices, 5 connected" in capsys.readouterr().out


def _box_profile(tmp_path: Path) -> Path:
    profile = tmp_path / "box.toml"
    profile.write_text(
        '[profile]\nname = "box"\nstorage_budget_bytes = 1000000\nram_budget_bytes = 100000000\n'
        "latency_budget_ms = 5.0\nthreads = 1\nint8_dot_product = false\n"
        "reference_ms = { fp32_conv = 1.0, fp32_matmul = 0.5, int8_conv = 1.0, int8_matmul = 0.5 }\n",
        encoding="utf-8",
    )
    return profile


def _credentials(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    lines = ["device_id,username,password,fleet,class,mqtt_host,mqtt_port"]
    lines += [f"d-{i},d-{i},pw{i},{fleet},box,{host},{port}" for i, (fleet, host, port) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.mqtt
def test_simulate_takes_fleet_host_and_port_from_the_credentials_file(
    tmp_path: Path, mqtt_broker: Any, caplog: pytest.LogCaptureFixture, capsys: Any
) -> None:
    """What `edgefleet device register --out` writes is all a simulated fleet needs: no --fleet/--host/--port, and
    every device infers (the gates need samples), with a progress line while it runs."""
    host, port = mqtt_broker.host, mqtt_broker.port
    creds = _credentials(tmp_path / "line3.csv", [("plant3", host, str(port))] * 3)
    args = ["simulate", "--credentials", str(creds), "--class", str(_box_profile(tmp_path))]
    args += ["--data-dir", str(tmp_path / "sim"), "--duration", "1.5", "--progress-every", "0.5"]
    with caplog.at_level(logging.INFO, logger="edgefleet.agent.simulate"):
        assert main(args) == 0
    assert "3 devices, 3 connected" in capsys.readouterr().out
    lines = [r.getMessage() for r in caplog.records if r.name == "edgefleet.agent.simulate"]
    assert lines[0] == f"simulating 3 box device(s) of fleet plant3 on {host}:{port} (3 inferring)"
    assert any("connected" in line for line in lines[1:]), lines


def test_credentials_that_disagree_on_the_broker_are_refused(tmp_path: Path, capsys: Any) -> None:
    creds = _credentials(tmp_path / "mixed.csv", [("plant3", "10.0.0.1", "1883"), ("plant3", "10.0.0.2", "1883")])
    args = ["simulate", "--credentials", str(creds), "--class", str(_box_profile(tmp_path)), "--duration", "0"]
    assert main(args) == 1
    assert "different mqtt_host values (10.0.0.1, 10.0.0.2); give --host" in capsys.readouterr().err
    bad_port = _credentials(tmp_path / "port.csv", [("plant3", "127.0.0.1", "18x83")])
    assert main(["simulate", "--credentials", str(bad_port), "--class", str(_box_profile(tmp_path))]) == 1
    assert "mqtt_port '18x83' is not a port number" in capsys.readouterr().err


def test_agent_and_controller_default_to_the_same_fleet() -> None:
    from edgefleet.agent.cli import DEFAULT_FLEET, DEFAULT_PORT
    from edgefleet.controller.config import Settings

    fields = Settings.__dataclass_fields__
    assert fields["fleet"].default == DEFAULT_FLEET
    assert fields["mqtt_port"].default == DEFAULT_PORT


def test_help_shows_every_default(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "inferences per second per inferring device (default: 1.0)" in shown
    assert "seconds per telemetry window (default: 10.0)" in shown
    assert "log detail (default: info)" in shown
    assert "(default: the credentials file's, else 127.0.0.1)" in shown  # said once, not twice


@pytest.mark.mqtt
def test_run_takes_password_fleet_host_and_port_from_its_credentials_row(
    tmp_path: Path, mqtt_broker: Any, capsys: Any
) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = mqtt_broker.host, mqtt_broker.port
    fleet = f"plant{tmp_path.name[-6:]}".replace("_", "")
    creds = _credentials(tmp_path / "line3.csv", [(fleet, host, str(port))] * 2)
    seen: list[str] = []
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{fleet}")
    watcher.on_message = lambda c, u, m: seen.append(m.topic)
    watcher.connect(host, port)
    watcher.subscribe(f"edgefleet/v1/{fleet}/device/+/status", qos=1)
    watcher.loop_start()
    try:
        args = ["run", "--device", "d-1", "--credentials", str(creds), "--class", str(_box_profile(tmp_path))]
        assert main([*args, "--data-dir", str(tmp_path / "dev"), "--duration", "1.5"]) == 0
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    assert f"edgefleet/v1/{fleet}/device/d-1/status" in seen
    missing = ["run", "--device", "d-9", "--credentials", str(creds), "--class", str(_box_profile(tmp_path))]
    assert main(missing) == 1
    assert "holds no row for device 'd-9'" in capsys.readouterr().err
