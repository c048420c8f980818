"""`edgefleet demo` end to end: a real Mosquitto, the controller, three simulated classes, compression, rollouts in
waves, a slow class recompressed from its telemetry, a bad artifact stopped at its canary, the summary.

The two full runs are `slow` (one to two minutes on two busy cores) and bounded by a subprocess timeout. The demo's
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
from edgefleet.controller.broker.mosquitto import find_mosquitto
from edgefleet.controller.config import Settings
from edgefleet.controller.credentials import verify_secret
from edgefleet.controller.data.home import init_home, open_database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.demo.builder import choose_rung
from edgefleet.controller.demo.credentials import credentials_path
from edgefleet.controller.demo.fleet import FleetSpec, simulated_ids
from edgefleet.controller.demo.models import LADDER, SWAPPED_LABELS, DemoModelError, fixed_recipe, swap_labels
from edgefleet.controller.demo.report import histogram_quantile
from edgefleet.controller.demo.run import DemoOptions, default_profiles_dir
from edgefleet.controller.demo.setup import MANAGED_AUTH, prepare_registry, simulation_profile
from edgefleet.controller.errors import ConfigError
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
    for rung in LADDER:
        assert parse_recipe(rung).passes[0].kind.value == "distill"
    # the 48 KiB partition of cortex-a53 needs int8 on top of the small student
    assert [p.kind.value for p in parse_recipe(fixed_recipe("cortex-a53")).passes] == ["distill", "quantize_static"]


def test_the_slow_fleet_command_runs_every_device_slower(tmp_path: Path) -> None:
    spec = FleetSpec(
        class_name="rpi4", profile_path=tmp_path / "rpi4.toml", devices=5, host="127.0.0.1", port=1884,
        fleet="demo", trusted_key=tmp_path / "key.pub", dataset=tmp_path / "val.npz", data_dir=tmp_path / "d",
        log_path=tmp_path / "sim.log", slow_devices=5, slow_factor=2.5,
    )  # fmt: skip
    argv = spec.argv()
    args = build_parser().parse_args(argv[argv.index("simulate") :])
    assert (args.fault_devices, args.slow) == (5, 2.5)
    plain = dataclasses.replace(spec, slow_devices=0).argv()
    assert "--slow" not in plain
    assert "--fault-devices" not in plain


def test_the_planted_artifact_swaps_labels_and_nothing_else(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    import torch

    from edgefleet.compression.examples.digits import DigitsNet
    from edgefleet.compression.export import export_onnx
    from edgefleet.controller.demo.models import _session

    torch.manual_seed(0)
    model = export_onnx(DigitsNet(width=0.25).eval(), np.zeros((1, 1, 16, 16), dtype=np.float32))
    bad = swap_labels(model)
    x = np.random.default_rng(0).random((8, 1, 16, 16), dtype=np.float32)
    good_session, bad_session = _session(model), _session(bad)
    name = good_session.get_inputs()[0].name
    good_logits = good_session.run(None, {name: x})[0]
    bad_logits = bad_session.run(None, {name: x})[0]
    order = list(range(10))
    for a, b in SWAPPED_LABELS:
        order[a], order[b] = order[b], order[a]
    np.testing.assert_allclose(bad_logits, good_logits[:, order], rtol=1e-5, atol=1e-6)
    assert len(bad) == pytest.approx(len(model), abs=64)  # same size, same speed: only the label map differs
    # a model whose output does not come from a Gemm with constant weights is refused with a reason
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 10])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])],
    )  # fmt: skip
    with pytest.raises(DemoModelError, match="does not come from a Gemm"):
        swap_labels(onnx.helper.make_model(graph).SerializeToString())


def test_the_recompression_takes_the_most_accurate_rung_predicted_to_fit() -> None:
    # baseline 1.1 ms (of which 1 ms is the full model's compute at device/host 5), now 2.5x slower, budget 2 ms
    kw: dict[str, Any] = {"base_p95_ms": 1.1, "slowdown": 2.5, "device_over_host": 5.0, "current_host_ms": 0.2,
                          "budget_ms": 2.0}  # fmt: skip
    index, predicted = choose_rung(rung_host_ms=[0.2, 0.08, 0.03], **kw)
    assert predicted == pytest.approx([2.75, 1.25, 0.625])
    assert index == 1  # the first rung that fits with the margin (1.25 x 1.5 <= 2)
    assert choose_rung(rung_host_ms=[0.2, 0.1, 0.03], **kw)[0] == 2  # 1.5 fits, but not with a 1.5x margin
    assert choose_rung(rung_host_ms=[0.2, 0.18], **kw)[0] == 1  # nothing fits: the fastest rung
    assert choose_rung(rung_host_ms=[0.2, 0.08], **{**kw, "base_p95_ms": 0.9, "slowdown": 1.0})[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slow-class", "nope"], "--slow-class nope is not one of the demo's classes"),
        (["--bad-class", "rpi4", "--slow-class", "rpi4"], "plant them in two classes"),
        (["--class", "rpi4", "--class", "rpi4"], "named twice"),
        (["--class", "rpi4", "--bad-class", "x86-gateway"], "--bad-class x86-gateway is not one of"),
    ],
)
def test_contradictory_demo_options_are_refused_before_anything_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    from typer.testing import CliRunner

    from edgefleet.controller.cli.main import app

    result = CliRunner().invoke(app, ["demo", *args, "--home", str(tmp_path / "home")], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not (tmp_path / "home").exists()  # nothing was set up


@pytest.mark.parametrize(
    "args",
    [["--slow-factor", "1"], ["--slow-factor", "nan"], ["--devices", "0"], ["--duration", "-1"], ["--rate", "0"],
     ["--telemetry-window", "0.1"], ["--compress", "magic"], ["--train-epochs", "0"]],
)  # fmt: skip
def test_out_of_range_demo_options_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    from typer.testing import CliRunner

    from edgefleet.controller.cli.main import app

    result = CliRunner().invoke(app, ["demo", *args, "--home", str(tmp_path / "home")], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "home").exists()


def test_demo_options_check_their_slow_factor() -> None:
    with pytest.raises(ConfigError, match=r"between 1\.5 and 10"):
        DemoOptions(slow_factor=1.2).check()
    with pytest.raises(ConfigError, match=r"between 1\.5 and 10"):
        DemoOptions(slow_factor=float("nan")).check()
    DemoOptions(slow_class=None, bad_class=None, classes=("cortex-a53",)).check()


@pytest.mark.slow
@pytest.mark.mqtt
@needs_mosquitto
def test_the_demo_tells_the_whole_story_and_stops_what_it_started(tmp_path: Path) -> None:
    """Waves, the slow class recompressed from its telemetry, the bad artifact stopped at its canary."""
    home = tmp_path / "home"
    run = subprocess.run(
        [str(EDGEFLEET), "demo", "--duration", "4", "--devices", "5", "--rate", "4", "--train-epochs", "3",
         "--home", str(home), "--json"],
        capture_output=True, text=True, timeout=420, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    summary = json.loads(run.stdout)
    assert summary["ok"] is True, summary["problems"]
    assert summary["problems"] == []
    stories = {c["device_class"]: c for c in summary["classes"]}
    assert list(stories) == ["x86-gateway", "rpi4", "cortex-a53"]
    for story in stories.values():
        first = story["versions"][0]
        # the first model of every class went out in waves: a canary of two devices, then the other three
        assert (first["version"], first["rollout_state"]) == (1, "completed")
        assert first["rollout_devices"].get("active", 0) >= 4, first  # the failure gate lets one of five refuse it
        assert first["waves_opened"] == 2
        assert story["devices_total"] == 5
        assert story["devices_on_current"] >= 4, story
        assert story["within_budget"] is True, story
        assert story["accuracy"] > 0.8, story  # ten classes: chance is 0.1
        assert story["labelled_samples"] > 0

    # the slow class: detected from telemetry, recompressed once, rolled out, back within its budget
    rpi4 = stories["rpi4"]
    assert [(v["version"], v["made_by"], v["rollout_state"]) for v in rpi4["versions"]] == [
        (1, "compression", "completed"), (2, "recompression", "completed"),
    ]  # fmt: skip
    assert rpi4["versions"][0]["recipe"] == "distill w1"  # the accurate model, not the fastest
    assert rpi4["current_version"] == 2
    assert [(r["trigger"], r["state"]) for r in rpi4["recompressions"]] == [("latency", "done")]
    assert rpi4["p95_latency_ms"] <= rpi4["latency_budget_ms"]
    assert any("over the" in e for e in rpi4["events"])
    assert any("recovered" in e for e in rpi4["events"])
    [build] = summary["builds"]
    assert build["class"] == "rpi4"
    assert build["slowdown"] > 1.5  # measured in the field: the devices run 2.5x slower
    assert build["width"] < 1.0

    # the bad artifact: stopped by the canary's accuracy gate, the canary rolled back, nobody else got it
    x86 = stories["x86-gateway"]
    bad = x86["versions"][1]
    assert (bad["version"], bad["made_by"], bad["rollout_state"]) == (2, "planted bad artifact", "aborted")
    assert bad["rollout_devices"] == {"rolled_back": 2}
    assert bad["waves_opened"] == 1
    assert bad["accuracy_measured"] < 0.7
    assert x86["current_version"] == 1
    assert any("gate breach" in e and "accuracy" in e for e in x86["events"])
    assert [(v["version"], v["made_by"]) for v in stories["cortex-a53"]["versions"]] == [(1, "compression")]
    assert stories["cortex-a53"]["recompressions"] == []

    # everything it started is gone, the fleets stopped cleanly (rpi4's twice: it restarted slow)
    pids = [int(p) for k in summary["stopped"] for p in re.findall(r"pid (\d+)", k)]
    assert len(pids) == 5
    assert not [p for p in pids if _alive(p)]
    assert [v for k, v in summary["stopped"].items() if k.startswith("fleet")] == [0, 0, 0, 0]
    assert "✓ stopped everything the demo started" in run.stderr
    assert "rollout" in run.stderr
    assert "gates" in run.stderr
    # the demo's broker was the secured one: per-device passwords and ACLs, anonymous clients refused
    assert summary["broker_auth"] == MANAGED_AUTH
    config = (home / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in config
    for name in stories:
        kept = credentials_path(home, name)
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert [c.device_id for c in read_credentials(kept, device_class=name)] == simulated_ids(name, 5)


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
        assert len(pids) == 4, "".join(seen)  # mosquitto and three fleets
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


def test_a_second_sigterm_while_stopping_does_not_cut_the_teardown_short(tmp_path: Path) -> None:
    """The fleets run in sessions of their own: a signal escaping the teardown would leave them running."""
    import io

    from rich.console import Console

    from edgefleet.controller.demo.run import Demo

    demo = Demo(DemoOptions(home=tmp_path), console=Console(file=io.StringIO()))
    stopped: list[str] = []

    def stop_all() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while stopping
        time.sleep(0.05)
        stopped.append("all")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    demo._stop_all = stop_all  # type: ignore[method-assign]
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with demo._teardown():
            pass
        assert stopped == ["all"]
        assert signal.getsignal(signal.SIGTERM) is interrupt, "the handler is back once everything is stopped"
    finally:
        signal.signal(signal.SIGTERM, previous)
