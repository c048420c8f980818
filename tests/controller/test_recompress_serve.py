"""The recompression loop inside the controller process (`ControllerApp`, `edgefleet serve`).

End to end on a real broker with real simulated devices: the class's devices run slower than profiled, the app's own
timer detects it (no test calls `step`), debounces it to one recompression, builds on its worker thread, rolls the new
artifact out, and the class ends on it within its budget. Also: approving a pending recompression while the app
runs, stopping the app during a build, a restart that finds a recompression still `building`, a missing signing key,
and class TOMLs whose `[policy]` table is broken.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import select
from waiting import wait_for

from edgefleet.agent.config import Faults
from edgefleet.agent.replay import load_dataset
from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.keys import load_signing_key, public_raw
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.broker.mosquitto import free_port
from edgefleet.controller.config import Settings, load_settings
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.tables import AuditEntry, Recompression
from edgefleet.controller.errors import ConfigError
from edgefleet.controller.recompress.loop import (
    RESTART_NOTE,
    RETRY_STARTED,
    BuildRequest,
    BuildResult,
    RecompressionLoop,
)
from edgefleet.controller.recompress.policy import RecompressionPolicy
from edgefleet.controller.rollout.api import class_current_version
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.controller.service.app import ControllerApp
from edgefleet.protocols.profile import ReferenceTimes, load_profile
from edgefleet.protocols.signing import key_id

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
N = 6
# A class profiled 2x slower than this host, 5 ms budget, devices 2.5x slower still (x5 in all): the heavy model
# (~2.5 ms of host time per inference) is far over it; the light one (a 4x3 MatMul: microseconds of warm compute,
# which is what a simulated device times) is far under.
CLASS_TOML = """\
[profile]
name = "gw"
storage_budget_bytes = 4_000_000
ram_budget_bytes = 268_435_456
latency_budget_ms = 5.0
threads = 1
int8_dot_product = false
max_accuracy_drop = 0.5
[profile.reference_ms]
fp32_conv = 2.0
fp32_matmul = 2.0
int8_conv = 2.0
int8_matmul = 2.0

[policy]
latency_windows = 2
min_samples = 10
min_labelled = 10
speed_factor_tolerance = 100.0
lookback_s = 600
cooldown_s = 600
mode = "{mode}"
"""


def heavy_onnx(path: Path, *, width: int = 256, layers: int = 1200) -> Path:
    """x[batch, 4] -> `layers` MatMuls by one shared width x width weight -> y[batch, 3]: slow to run, small to ship."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.full((4, width), 0.1, dtype="float32"), "W0"),
        numpy_helper.from_array((np.eye(width) * 0.999).astype("float32"), "W"),
        numpy_helper.from_array(np.full((width, 3), 0.01, dtype="float32"), "W1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h0"]),
        *(helper.make_node("MatMul", [f"h{i}", "W"], [f"h{i + 1}"]) for i in range(layers)),
        helper.make_node("MatMul", [f"h{layers}", "W1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@dataclasses.dataclass
class Fleet:
    """A home with class `gw` (from a TOML with a [policy] table), N devices and the heavy model as version 1."""

    settings: Settings
    fleet: str
    class_toml: Path
    light: Path
    builds: list[BuildRequest] = dataclasses.field(default_factory=list)

    def catalog(self, db: object) -> ArtifactCatalog:
        return ArtifactCatalog(
            db,  # type: ignore[arg-type]
            store=ArtifactStore(self.settings.store_dir),
            signing_key=load_signing_key(self.settings.key_path),
            actor="test",
        )

    def builder(self, db: object) -> object:
        def build(request: BuildRequest) -> BuildResult:
            """The compression worker's stand-in: the light model, signed as the class's next version."""
            self.builds.append(request)
            artifact = self.catalog(db).add_from_onnx(
                "m", class_name=request.class_name, onnx_path=self.light, metrics={"predicted_p95_ms": 0.5}
            )
            correction = request.profile.speed_correction
            return BuildResult(artifact.id or 0, {"recipe": "light", "speed_correction": correction})

        return build


@pytest.fixture
def fleet(cli, mqtt_broker, tmp_path: Path, tiny_onnx: Path) -> Fleet:
    name = f"r{uuid.uuid4().hex[:10]}"
    cli.env.update(
        {"EDGEFLEET_FLEET": name, "EDGEFLEET_MQTT_HOST": mqtt_broker.host, "EDGEFLEET_MQTT_PORT": str(mqtt_broker.port),
         "EDGEFLEET_MQTT_CLIENT_ID": f"ctl-{name}", "EDGEFLEET_TELEMETRY_WINDOW_S": "1"}
    )  # fmt: skip
    cli.ok("init")
    toml = tmp_path / "gw.toml"
    toml.write_text(CLASS_TOML.format(mode="auto"))
    out = cli.ok("class", "add", "gw", "--profile", str(toml))
    assert "recompression policy: auto" in out
    cli.ok("device", "register", "--class", "gw", *[f"--id={name}-{i:05d}" for i in range(N)])
    cli.ok("model", "add", "m", "--onnx", str(tiny_onnx))
    settings = load_settings(flags={"home": cli.home}, env=cli.env)
    settings = dataclasses.replace(settings, metrics_port=free_port(), flush_interval_s=0.1)
    return Fleet(settings, name, toml, tiny_onnx)


def simulate(f: Fleet, tmp_path: Path, *, slow: float) -> tuple[FleetSimulator, threading.Thread, threading.Event]:
    data = tmp_path / "replay.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(64, 4)).astype(np.float32), y=rng.integers(0, 3, size=64))
    public = public_raw(load_signing_key(f.settings.key_path))
    spec = SimulatorSpec(
        devices=N, profile=load_profile(f.class_toml), data_root=tmp_path / "sim", fleet=f.fleet,
        host=f.settings.mqtt_host, port=f.settings.mqtt_port, id_prefix=f.fleet,
        trusted_keys={key_id(public): public}, telemetry_window_s=0.1, probation_s=0.2, dataset=load_dataset(data),
        infer_fraction=1.0, infer_rate_hz=20.0, faults=Faults(slow_factor=slow), fault_devices=N,
        host_reference=ReferenceTimes(fp32_conv=1.0, fp32_matmul=1.0, int8_conv=1.0, int8_matmul=1.0),  # devices 2x
    )  # fmt: skip
    sim = FleetSimulator(spec)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: sim.run(until=stop.is_set), daemon=True)
    sim.start()
    thread.start()
    return sim, thread, stop


@pytest.mark.mqtt
@pytest.mark.slow
def test_the_app_detects_slow_devices_by_itself_and_ends_on_the_new_artifact(fleet: Fleet, tmp_path: Path) -> None:
    f = fleet
    app = ControllerApp(f.settings, rollout_interval_s=0.2, recompress_interval_s=0.3, recompress_builder=None)
    assert app.recompression is not None
    app.recompression.builder = f.builder(app.db)
    app.recompression.plan = WavePlan(canary="2", growth=2)
    # The new model is judged on the class budget (the latency gate); the replayed labels are random. A device's
    # first telemetry window on the new version still holds a few of the old model's inferences (the agent tags a
    # window with the model it ends on) and a fresh session's first run is slow: 1000 samples keep those few under
    # the 5% that a p95 ignores.
    app.recompression.gates = GateConfig(
        window_s=120, min_devices=2, min_samples=1000, min_labelled=10, max_error_rate=0.5, waived=("accuracy",)
    )
    heavy = heavy_onnx(tmp_path / "heavy.onnx")
    first = f.catalog(app.db).add_from_onnx("m", class_name="gw", onnx_path=heavy, metrics={"predicted_p95_ms": 4.0})
    app.start(metrics_server=False)
    sim, thread, stop = simulate(f, tmp_path, slow=2.5)
    try:
        assert wait_for(lambda: sim.connected == N, 20)
        from edgefleet.controller.service.deploy import Deployer

        deployer = Deployer(app.db, catalog=f.catalog(app.db), publisher=app.mqtt, actor="test")
        assert not any(r.error for r in deployer.deploy(first.id or 0, class_name="gw"))
        assert wait_for(lambda: sim.summary().versions == {1: N}, 30), sim.summary()

        def recompressions() -> list[Recompression]:
            with app.db.reading() as session:
                return list(session.exec(select(Recompression)).all())

        assert wait_for(lambda: len(recompressions()) == 1, 60), "no recompression was triggered"
        (row,) = recompressions()
        assert row.trigger == "latency", row.summary
        assert "over the 5 ms budget" in row.summary
        assert wait_for(lambda: app.recompression.get(row.id or 0).state in {"done", "failed"}, 90), (
            app.recompression.get(row.id or 0)
        )
        done = app.recompression.get(row.id or 0)
        if done.state != "done":
            from edgefleet.controller.rollout.api import Rollouts

            rollout = Rollouts(app.db).get(done.rollout_id or 0)
            pytest.fail(f"{done.note}: {rollout.breach_json}")
        assert len(f.builds) == 1  # debounced: the slow windows went on while it built and rolled out
        assert f.builds[0].profile.speed_correction > 1.0  # learned from the field before planning
        assert wait_for(lambda: sim.summary().versions == {2: N}, 30), sim.summary()
        with app.db.reading() as session:
            assert class_current_version(session, "gw") == 2
            actions = {a.action for a in session.exec(select(AuditEntry)).all()}
        assert {"recompress.trigger", "class.profile.update", "recompress.built", "recompress.approve"} <= actions
        assert len(recompressions()) == 1
    finally:
        stop.set()
        thread.join(10)
        sim.stop()
        app.stop()


# ---------------------------------------------------------------------------------------------------------------
# Without devices: planted telemetry windows, a builder that waits, restarts.

EIGHT_MS = 0.008


def plant(db: object, *, class_name: str, device_ids: list[str], windows: int = 3, latency: float = EIGHT_MS) -> None:
    """Devices on version 1 and `windows` one-second rollups ending now, every device at `latency`."""
    from edgefleet.controller.data.tables import Device, TelemetryRollup
    from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, bucket_index

    counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
    counts[bucket_index(latency)] = 30
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with db.transaction() as session:  # type: ignore[attr-defined]
        for device in session.exec(select(Device).where(Device.class_name == class_name)).all():
            device.online, device.model_version = True, 1
            session.add(device)
        for k in range(windows):
            for device_id in device_ids:
                session.add(
                    TelemetryRollup(
                        device_id=device_id, class_name=class_name, model_version=1,
                        window_start=now - dt.timedelta(seconds=windows - k), window_seconds=1, inferences=30,
                        labelled=0, correct=0, latency_counts_json=json.dumps(counts),
                    )
                )  # fmt: skip


@pytest.fixture
def home(cli, mqtt_broker, tmp_path: Path, tiny_onnx: Path) -> Fleet:
    """Class `gw` (policy mode approve) with 3 registered devices and version 1 of model `m`; no simulator."""
    name = f"h{uuid.uuid4().hex[:10]}"
    cli.env.update(
        {"EDGEFLEET_FLEET": name, "EDGEFLEET_MQTT_HOST": mqtt_broker.host, "EDGEFLEET_MQTT_PORT": str(mqtt_broker.port),
         "EDGEFLEET_MQTT_CLIENT_ID": f"ctl-{name}"}
    )  # fmt: skip
    cli.ok("init")
    toml = tmp_path / "gw.toml"
    toml.write_text(CLASS_TOML.format(mode="approve"))
    cli.ok("class", "add", "gw", "--profile", str(toml))
    cli.ok("device", "register", "--class", "gw", *[f"--id={name}-{i}" for i in range(3)])
    cli.ok("model", "add", "m", "--onnx", str(tiny_onnx))
    settings = load_settings(flags={"home": cli.home}, env=cli.env)
    f = Fleet(dataclasses.replace(settings, metrics_port=free_port()), name, toml, tiny_onnx)
    app = ControllerApp(f.settings, recompress=False, rollouts=False, serve_blocks=False)
    try:
        f.catalog(app.db).add_from_onnx("m", class_name="gw", onnx_path=tiny_onnx, metrics={"predicted_p95_ms": 2.0})
        plant(app.db, class_name="gw", device_ids=[f"{name}-{i}" for i in range(3)])
    finally:
        app.db.dispose()
    return f


def state(db: object) -> str | None:
    """The state of the one recompression, None while there is none."""
    with db.reading() as session:  # type: ignore[attr-defined]
        rows = session.exec(select(Recompression)).all()
    return rows[0].state if len(rows) == 1 else None


def only(db: object) -> Recompression:
    with db.reading() as session:  # type: ignore[attr-defined]
        rows = session.exec(select(Recompression)).all()
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.mqtt
def test_stop_during_a_build_is_bounded_and_the_restart_retries_it_once(home: Fleet) -> None:
    release = threading.Event()
    started = threading.Event()

    def blocking(request: BuildRequest) -> BuildResult:
        started.set()
        release.wait(30)
        raise RuntimeError("the planner was interrupted")

    app = ControllerApp(home.settings, recompress_interval_s=0.2, recompress_builder=blocking, serve_blocks=False)
    app.start(metrics_server=False)
    try:
        assert started.wait(20), "the loop did not start a build by itself"
        assert only(app.db).state == "building"
        # The loop keeps stepping while the build runs: it is not blocked (and debounces: still one row).
        runner = app._recompress_runner
        assert runner is not None
        steps = runner.steps
        assert wait_for(lambda: runner.steps >= steps + 3, 10)
        assert only(app.db).state == "building"
    finally:
        t0 = time.monotonic()
        app.stop()
        stopped_in = time.monotonic() - t0
        release.set()
    assert stopped_in < 8, stopped_in
    row = only(app.db)
    assert row.state == "building"  # the interrupted build's failure is not recorded: the restart decides
    app.db.dispose()

    # Restart: the build is retried (once), with the reason noted; it succeeds this time and waits for approval.
    restarted = ControllerApp(
        home.settings, recompress_interval_s=0.2, recompress_builder=home.builder(None), serve_blocks=False
    )
    home.builds.clear()
    restarted.recompression.builder = home.builder(restarted.db)  # type: ignore[union-attr]
    restarted.start(metrics_server=False)
    try:
        assert wait_for(lambda: state(restarted.db) == "pending", 20), only(restarted.db)
        row = only(restarted.db)
        assert row.note is not None
        assert row.note.startswith(RESTART_NOTE)
        assert len(home.builds) == 1
        with restarted.db.reading() as session:
            actions = [a.action for a in session.exec(select(AuditEntry)).all()]
        assert "recompress.retry" in actions
    finally:
        restarted.stop()


@pytest.mark.mqtt
def test_a_build_found_building_after_its_retry_is_failed_not_retried_again(home: Fleet) -> None:
    calls: list[int] = []

    def counting(request: BuildRequest) -> BuildResult:
        calls.append(request.recompression_id)
        raise RuntimeError("unexpected")

    app = ControllerApp(home.settings, recompress_interval_s=0.2, recompress_builder=counting, serve_blocks=False)
    loop = app.recompression
    assert loop is not None
    loop.set_policy("gw", RecompressionPolicy(latency_windows=2, min_samples=10, speed_factor_tolerance=None))
    with app.db.reading() as session:
        v1 = session.exec(select(Recompression)).first()
    assert v1 is None
    # A recompression that was already retried once after a restart, its retry began, then the controller died again.
    from edgefleet.controller.data.tables import Artifact

    now = dt.datetime.now(dt.UTC)
    with app.db.transaction() as session:
        artifact = session.exec(select(Artifact)).one()
        session.add(
            Recompression(
                class_name="gw", model_name="m", from_artifact_id=artifact.id or 0, trigger="latency",
                summary="planted", state="building", mode="approve", created_at=now, updated_at=now,
                note=f"{RESTART_NOTE} (found building at {now.isoformat()}){RETRY_STARTED} {now.isoformat()}",
            )
        )  # fmt: skip
    app.start(metrics_server=False)
    try:
        assert wait_for(lambda: state(app.db) == "failed", 10), only(app.db)
        assert "stopped twice" in (only(app.db).note or "")
        time.sleep(1.0)  # several steps: the cooldown holds, nothing is built again
        assert calls == []
        assert only(app.db).state == "failed"
    finally:
        app.stop()


@pytest.mark.mqtt
def test_without_a_signing_key_the_default_worker_fails_the_recompression_clearly(home: Fleet) -> None:
    home.settings.key_path.unlink()
    app = ControllerApp(home.settings, recompress_interval_s=0.2, serve_blocks=False)
    assert "no signing key" in app.recompression_status()
    app.start(metrics_server=False)
    try:
        assert wait_for(lambda: state(app.db) == "failed", 20), "no recompression failed"
        note = only(app.db).note or ""
        assert "no signing key at" in note
        assert "edgefleet init" in note
        runner = app._recompress_runner
        assert runner is not None
        assert runner.failures == 0  # the loop itself went on
    finally:
        app.stop()


@pytest.mark.mqtt
def test_serve_runs_the_loop_and_an_operator_approves_through_the_cli(home: Fleet, cli) -> None:
    """`edgefleet serve`: its startup line names the policies; its loop proposes (here: the default worker fails,
    the model is not a shipped example), and an approval from the CLI starts a rollout that serve's runner takes."""
    env = {**os.environ, **cli.env, "EDGEFLEET_METRICS_PORT": str(free_port())}
    serve = subprocess.Popen(
        [*EDGEFLEET, "serve", "--recompress-interval", "0.3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    app = ControllerApp(home.settings, recompress=False, rollouts=False, serve_blocks=False)  # a reader, not run
    try:
        assert wait_for(lambda: _recompressions(app.db) == 1, 30), "serve's loop did not trigger"
        assert wait_for(lambda: state(app.db) == "failed", 30), only(app.db)
        assert "retrains shipped examples only" in (only(app.db).note or "")
        # A proposal the operator approves from the CLI while serve runs.
        artifact = home.catalog(app.db).add_from_onnx("m", class_name="gw", onnx_path=home.light)
        now = dt.datetime.now(dt.UTC)
        with app.db.transaction() as session:
            proposal = Recompression(
                class_name="gw", model_name="m", from_artifact_id=1, trigger="latency", summary="planted",
                state="pending", mode="approve", artifact_id=artifact.id, created_at=now, updated_at=now,
            )  # fmt: skip
            session.add(proposal)
            session.flush()
            pid = proposal.id
        out = cli.ok("recompress", "approve", str(pid))
        assert "approved: rollout" in out
        loop = RecompressionLoop(app.db)
        rollout_id = loop.get(pid or 0).rollout_id
        from edgefleet.controller.rollout.api import Rollouts

        assert wait_for(lambda: Rollouts(app.db).get(rollout_id or 0).state == "running", 20)
        assert loop.get(pid or 0).state == "rolling_out"
    finally:
        code, output = stop_process(serve)
        app.db.dispose()
    assert code == 0, output
    assert "recompression loop every 0.3 s; policies: gw (approve, K=2)" in output
    assert "Traceback" not in output


def test_serve_refuses_a_bad_interval_and_says_when_the_loop_is_off(cli) -> None:
    result = cli("serve", "--recompress-interval", "0")
    assert result.exit_code == 2
    assert "recompress-interval" in result.output
    assert cli("serve", "--recompress-interval", "x").exit_code == 2
    cli.ok("init")
    settings = load_settings(flags={"home": cli.home}, env={"EDGEFLEET_RECOMPRESS": "off"})
    assert settings.recompress is False
    app = ControllerApp(settings, recompress=settings.recompress)
    try:
        assert app.recompression is None
        assert app.recompression_status() == "recompression loop off"
    finally:
        app.db.dispose()
    env = {"EDGEFLEET_RECOMPRESS_INTERVAL_S": "2.5"}
    assert load_settings(flags={"home": cli.home}, env=env).recompress_interval_s == 2.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(ConfigError, match="recompress_interval_s"):
            load_settings(flags={"home": cli.home}, env={"EDGEFLEET_RECOMPRESS_INTERVAL_S": bad})
    with pytest.raises(ConfigError, match="recompress"):
        load_settings(flags={"home": cli.home}, env={"EDGEFLEET_RECOMPRESS": "maybe"})


def _recompressions(db: object) -> int:
    with db.reading() as session:  # type: ignore[attr-defined]
        return len(session.exec(select(Recompression)).all())


EDGEFLEET = [sys.executable, "-c", "from edgefleet.controller.cli.main import main; main()"]


def stop_process(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return proc.returncode, out.decode(errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# Policies from the class TOML.

PROFILE_ONLY = CLASS_TOML.split("[policy]", maxsplit=1)[0]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("policy = 3\n", "`policy` must be a table"),
        ("[policy]\nmode = 'sometimes'\n", "mode"),
        ("[policy]\nlatency_windows = 0\n", "latency_windows"),
        ("[policy]\nlatency_windows = 'many'\n", "latency_windows"),
        ("[policy]\ncooldown_s = nan\n", "cooldown_s"),
        ("[policy]\nlookback_s = inf\n", "lookback_s"),
        ("[policy]\nmax_oom_rate = 2\n", "max_oom_rate"),
        ("[policy]\nspeed_factor_tolerance = true\n", "false to turn it off"),
        ("[policy]\nunknown = 1\n", "unknown"),
        ("[policy]\n[policy.nested]\nx = 1\n", "nested"),
    ],
)
def test_a_broken_policy_table_is_a_clear_error_and_nothing_is_stored(
    cli, tmp_path: Path, policy: str, message: str
) -> None:
    cli.ok("init")
    bad = tmp_path / "bad.toml"
    # A top-level key goes before the first table (after it, TOML puts it inside [profile]).
    bad.write_text(policy + PROFILE_ONLY if policy.startswith("policy =") else PROFILE_ONLY + policy)
    result = cli("class", "add", "gw", "--profile", str(bad))
    assert result.exit_code == 1
    assert message in result.output
    assert "[policy]" in result.output or "policy" in result.output
    assert "Traceback" not in result.output
    assert cli.json("class", "list") == []
    # An update with the same broken table changes nothing either.
    good = tmp_path / "good.toml"
    good.write_text(CLASS_TOML.format(mode="auto"))
    cli.ok("class", "add", "gw", "--profile", str(good))
    result = cli("class", "update", "gw", "--profile", str(bad))
    assert result.exit_code == 1
    shown = cli.json("class", "show", "gw")
    assert shown["policy"]["mode"] == "auto"


def test_class_add_and_update_store_the_policy_of_the_toml(cli, tmp_path: Path, profiles: Path) -> None:
    cli.ok("init")
    for name in ("rpi4", "x86-gateway", "cortex-a53"):
        out = cli.ok("class", "add", name, "--profile", str(profiles / f"{name}.toml"))
        assert "recompression policy:" in out
    assert cli.json("class", "show", "x86-gateway")["policy"]["mode"] == "auto"
    assert cli.json("class", "show", "rpi4")["policy"]["speed_factor_tolerance"] == 1.5
    assert cli.json("class", "show", "x86-gateway")["policy"]["speed_factor_tolerance"] is None  # `false` in the TOML
    changed = tmp_path / "rpi4.toml"
    changed.write_text((profiles / "rpi4.toml").read_text().replace('mode = "approve"', 'mode = "auto"'))
    assert "policy: auto" in cli.ok("class", "update", "rpi4", "--profile", str(changed))
    assert cli.json("class", "show", "rpi4")["policy"]["mode"] == "auto"
    bare = tmp_path / "bare.toml"
    bare.write_text(PROFILE_ONLY.replace('"gw"', '"rpi4"'))
    assert "no [policy] table" in cli.ok("class", "update", "rpi4", "--profile", str(bare))
    shown = cli.json("class", "show", "rpi4")
    assert shown["policy"] is None
    assert shown["profile"]["latency_budget_ms"] == 5.0
    result = cli("class", "update", "nope", "--profile", str(bare))
    assert result.exit_code == 1
    assert "does not exist" in result.output
    result = cli("class", "add", "rpi4", "--profile", str(bare))
    assert result.exit_code == 1
    assert "class update" in result.output
    db = Database.open(load_settings(flags={"home": cli.home}, env=cli.env).db_url)
    try:
        with db.reading() as session:
            actions = {a.action for a in session.exec(select(AuditEntry)).all()}
    finally:
        db.dispose()
    assert {"class.update", "recompress.policy", "recompress.policy.remove"} <= actions
