"""`edgefleet demo` end to end: a real Mosquitto, the controller, two simulated classes, compression, deploy, telemetry.

The two full runs are `slow` (about a minute each on two busy cores) and bounded by a subprocess timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgefleet.agent.cli import build_parser
from edgefleet.controller.demo import default_profiles_dir
from edgefleet.controller.demo_fleet import FleetSpec, simulated_ids
from edgefleet.controller.demo_models import fixed_recipe
from edgefleet.controller.demo_report import histogram_quantile
from edgefleet.controller.demo_setup import simulation_profile
from edgefleet.controller.mosquitto import find_mosquitto
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
    )
    argv = spec.argv()
    verb = argv.index("simulate")
    args = build_parser().parse_args(argv[verb:])
    assert (args.devices, args.port, args.id_prefix, args.infer_fraction) == (4, 1884, "rpi4", 1.0)
    # the ids the demo registers are the ones the simulator gives its devices
    assert simulated_ids("rpi4", 2) == ["rpi4-00000", "rpi4-00001"]


def test_simulated_devices_run_one_host_thread_and_keep_the_rest_of_their_profile(tmp_path: Path) -> None:
    for name in ("rpi4", "cortex-a53"):
        source = default_profiles_dir() / f"{name}.toml"
        copy = simulation_profile(source, tmp_path)
        original, simulated = load_profile(source), load_profile(copy)
        assert simulated.threads == 1
        assert simulated.model_dump(exclude={"threads"}) == original.model_dump(exclude={"threads"})


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
