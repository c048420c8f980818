"""Rollouts against a real broker: waves, each gate tripping, pause/resume/abort, timeouts, catch-up.

The engine is driven directly (`tick(now)` with chosen times). Devices are played by the test: a real MQTT
subscriber collects the commands the engine publishes, and the devices' answers go through `apply_job_event`,
the function the controller's service calls for job events. Telemetry is planted as rollup rows.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client import CollectorRegistry
from rich.console import Console
from sqlmodel import col, select
from waiting import wait_for

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.cli.rollout import render
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import DeploymentJob, Device, Rollout, RolloutDevice, TelemetryRollup
from edgefleet.controller.errors import ConflictError, NotFoundError, RegistryError
from edgefleet.controller.rollout.api import Rollouts
from edgefleet.controller.rollout.engine import RolloutEngine
from edgefleet.controller.rollout.metrics import RolloutCollector
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.controller.rollout.status import describe
from edgefleet.controller.service.mqtt import MqttClient
from edgefleet.controller.service.state_updates import apply_job_event
from edgefleet.protocols.codec import decode_command
from edgefleet.protocols.commands import DeployCommand, RollbackCommand
from edgefleet.protocols.messages import JobEvent
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, bucket_index
from edgefleet.protocols.topics import parse_topic

pytestmark = pytest.mark.mqtt

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
FAST_GATES = GateConfig(window_s=600, min_devices=1, min_samples=20, min_labelled=20, data_wait_s=3600)


class Field:
    """A registry with one class of devices on model v1, an artifact v2, the engine, and the devices' inbox."""

    def __init__(self, db: Database, broker: object, tmp: Path, onnx: Path, devices: int) -> None:
        self.db = db
        self.fleet = f"r{uuid.uuid4().hex[:10]}"
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        registry = Registry(db)
        registry.create_fleet(self.fleet)
        registry.add_class(load_profile(PROFILES / "rpi4.toml"))
        self.ids = [f"pi-{i:02d}" for i in range(devices)]
        registry.register_devices(self.ids, class_name="rpi4", fleet=self.fleet)
        registry.add_model("tiny", source="test", task="classification")
        catalog = ArtifactCatalog(db, store=ArtifactStore(tmp / "store"), signing_key=Ed25519PrivateKey.generate())
        self.v1 = catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx)
        self.v2 = catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx, metrics={"accuracy": 0.9})
        self.set_devices(self.ids, online=True, version=1)
        self.inbox: dict[str, list[DeployCommand | RollbackCommand]] = defaultdict(list)
        host, port = broker.host, broker.port  # type: ignore[attr-defined]
        self.sub = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sub-{self.fleet}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.sub.on_message = self._received
        self.sub.connect(host, port)
        self.sub.subscribe(f"edgefleet/v1/{self.fleet}/device/+/cmd", qos=1)
        self.sub.loop_start()
        self.pub = MqttClient(host=host, port=port, client_id=f"ctl-{self.fleet}", session_expiry_s=0)
        self.pub.connect(timeout=10)
        self.engine = RolloutEngine(db, publisher=self.pub)
        self.rollouts = Rollouts(db, clock=lambda: self.now)
        time.sleep(0.2)

    def _received(self, client: object, userdata: object, message: paho.MQTTMessage) -> None:
        command = decode_command(message.payload)
        device = parse_topic(message.topic).device
        assert device is not None
        assert isinstance(command, DeployCommand | RollbackCommand)
        self.inbox[device].append(command)

    def close(self) -> None:
        self.sub.loop_stop()
        self.sub.disconnect()
        self.pub.close()

    def set_devices(self, ids: list[str], *, online: bool, version: int | None = None) -> None:
        with self.db.transaction() as session:
            for device_id in ids:
                device = session.get(Device, device_id)
                assert device is not None
                device.online = online
                device.connected_at = self.now
                if version is not None:
                    device.model_version = version
                session.add(device)

    def tick(self, seconds: float = 0.0) -> None:
        self.now += dt.timedelta(seconds=seconds)
        self.engine.tick(self.now)

    def commands(self) -> int:
        return sum(len(v) for v in self.inbox.values())

    def answer(self, device_id: str, state: str, *, result: int = 0) -> None:
        """The device reports on the last command it received."""
        command = self.inbox[device_id][-1]
        version = 2 if state == "active" and isinstance(command, DeployCommand) else None
        if isinstance(command, RollbackCommand):
            version = command.target_version
        event = JobEvent.model_validate(
            {
                "job_id": command.job_id,
                "state": state,
                "result": result,
                "timestamp": self.now,
                "model_version": version,
            }
        )
        assert apply_job_event(self.db, device_id, event, now=self.now)

    def telemetry(self, ids: list[str], *, version: int = 2, latency: float = 0.001, labelled: int = 50,
                  correct: int = 48, errors: int = 0, inferences: int = 50) -> None:  # fmt: skip
        counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
        counts[bucket_index(latency)] = inferences
        with self.db.transaction() as session:
            for device_id in ids:
                session.add(
                    TelemetryRollup(
                        device_id=device_id, class_name="rpi4", model_version=version,
                        window_start=self.now - dt.timedelta(seconds=30) + dt.timedelta(microseconds=len(counts)),
                        window_seconds=60, messages=1, inferences=inferences, errors=errors, labelled=labelled,
                        correct=correct, latency_sum_s=latency * inferences, latency_counts_json=json.dumps(counts),
                    )
                )  # fmt: skip

    def rows(self, rollout_id: int) -> dict[str, RolloutDevice]:
        with self.db.reading() as session:
            found = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all()
        return {r.device_id: r for r in found}

    def rollout(self, rollout_id: int) -> Rollout:
        return self.rollouts.get(rollout_id)

    def settle_wave(self, rollout_id: int, *, healthy: bool = True) -> list[str]:
        """Devices of the current wave got their command, answer `active` and report telemetry."""
        rows = self.rows(rollout_id)
        wave = self.rollout(rollout_id).current_wave
        ids = [d for d, r in rows.items() if r.wave == wave and r.state == "in_progress"]
        assert wait_for(lambda: all(self.inbox[d] for d in ids)), "commands did not arrive"
        for device_id in ids:
            self.answer(device_id, "active")
        if healthy:
            self.telemetry(ids)
        return ids


@pytest.fixture
def field(mqtt_broker: object, tmp_path: Path, tiny_onnx: Path) -> Iterator[Callable[..., Field]]:
    made: list[Field] = []

    def make(devices: int = 6) -> Field:
        db = Database.open(f"sqlite:///{tmp_path / f'reg{len(made)}.db'}", timeout=2)
        db.migrate()
        made.append(Field(db, mqtt_broker, tmp_path, tiny_onnx, devices))
        return made[-1]

    yield make
    for f in made:
        f.close()
        f.db.dispose()


def start(f: Field, **kwargs: object) -> int:
    plan = kwargs.pop("plan", WavePlan(canary="1", growth=2, max_concurrent=10, device_timeout_s=60))
    gates = kwargs.pop("gates", FAST_GATES)
    rollout = f.rollouts.start("rpi4:2", class_name="rpi4", plan=plan, gates=gates, **kwargs)  # type: ignore[arg-type]
    assert rollout.id is not None
    return rollout.id


def test_waves_grow_until_every_device_runs_the_new_model(field: Callable[..., Field]) -> None:
    f = field(7)
    rid = start(f)
    assert f.rollout(rid).state == "pending"
    waves: list[int] = []
    for _ in range(10):
        f.tick(1)
        if f.rollout(rid).state == "completed":
            break
        waves.append(len(f.settle_wave(rid)))
    assert waves == [1, 2, 4]
    rows = f.rows(rid)
    assert {r.state for r in rows.values()} == {"active"}
    assert wait_for(lambda: f.commands() == 7)
    assert all(len(f.inbox[d]) == 1 for d in f.ids)  # one command per device, none sent twice
    with f.db.reading() as session:
        jobs = session.exec(select(DeploymentJob)).all()
    assert sorted(j.state for j in jobs) == ["active"] * 7
    assert f.rollout(rid).finished_at is not None


def test_max_concurrent_caps_jobs_in_flight(field: Callable[..., Field]) -> None:
    f = field(6)
    rid = start(f, plan=WavePlan(canary="6", max_concurrent=2, device_timeout_s=60))
    f.tick(1)
    assert sum(r.state == "in_progress" for r in f.rows(rid).values()) == 2
    assert wait_for(lambda: f.commands() == 2)
    for device_id in list(f.inbox):
        f.answer(device_id, "active")
    f.tick(1)
    assert sum(r.state == "in_progress" for r in f.rows(rid).values()) == 2
    assert sum(r.state == "active" for r in f.rows(rid).values()) == 2


BAD_TELEMETRY = {
    "latency_p95": {"latency": 0.01},
    "accuracy": {"correct": 30},
    "error_rate": {"errors": 10},
}


@pytest.mark.parametrize("gate", [*BAD_TELEMETRY, "job_failure_rate"])
def test_each_gate_pauses_the_rollout_on_planted_telemetry(field: Callable[..., Field], gate: str) -> None:
    f = field(6)
    rid = start(f)
    f.tick(1)
    f.settle_wave(rid)
    f.tick(1)  # canary healthy: wave 1 opens
    assert f.rollout(rid).current_wave == 1
    ids = [d for d, r in f.rows(rid).items() if r.wave == 1]
    assert wait_for(lambda: all(f.inbox[d] for d in ids))
    if gate == "job_failure_rate":
        for device_id in ids:
            f.answer(device_id, "failed", result=6)
    else:
        for device_id in ids:
            f.answer(device_id, "active")
        f.telemetry(ids, **BAD_TELEMETRY[gate])  # type: ignore[arg-type]
    f.tick(1)
    rollout = f.rollout(rid)
    assert rollout.state == "paused"
    breach = json.loads(rollout.breach_json or "{}")
    assert [g["name"] for g in breach["gates"]] == [gate]
    f.tick(1)
    assert f.rollout(rid).current_wave == 1  # no further wave while paused
    assert len(f.rows(rid)) == 3


def test_status_and_metrics_show_the_breached_gate(field: Callable[..., Field]) -> None:
    f = field(6)
    rid = start(f)
    f.tick(1)
    (canary,) = f.settle_wave(rid, healthy=False)
    f.telemetry([canary], latency=0.01)
    f.tick(1)
    registry = CollectorRegistry()
    registry.register(RolloutCollector(f.db))
    value = registry.get_sample_value
    labels = {"rollout": str(rid), "device_class": "rpi4", "model": "tiny", "model_version": "2"}
    assert value("edgefleet_rollout_state", {**labels, "state": "paused"}) == 1
    assert value("edgefleet_rollout_state", {**labels, "state": "running"}) == 0
    assert value("edgefleet_rollout_gate_breached", {"rollout": str(rid), "gate": "latency_p95"}) == 1
    assert value("edgefleet_rollout_gate_value", {"rollout": str(rid), "gate": "latency_p95"}) == 0.01
    assert value("edgefleet_rollout_gate_threshold", {"rollout": str(rid), "gate": "latency_p95"}) == 0.002
    assert value("edgefleet_rollout_devices", {"rollout": str(rid), "wave": "canary", "outcome": "active"}) == 1
    assert value("edgefleet_class_latency_budget_seconds", {"device_class": "rpi4"}) == 0.002
    view = describe(f.db, rid)
    assert view["waves"][0]["states"] == {"active": 1}
    console = Console(record=True, width=160)
    console.print(render(view))
    text = console.export_text()
    assert "latency_p95" in text
    assert "breach" in text
    assert "canary" in text


def test_accuracy_is_judged_against_the_previous_model(field: Callable[..., Field]) -> None:
    f = field(6)
    f.telemetry(f.ids[3:], version=1, labelled=100, correct=99)  # the old model: 0.99 in the field
    rid = start(f)
    f.tick(1)
    (canary,) = f.settle_wave(rid, healthy=False)
    f.telemetry([canary], labelled=100, correct=95)  # 0.95: above the artifact's 0.90, below 0.99 - 0.02
    f.tick(1)
    rollout = f.rollout(rid)
    assert rollout.state == "paused"
    (accuracy,) = json.loads(rollout.breach_json or "{}")["gates"]
    assert accuracy["name"] == "accuracy"
    assert accuracy["threshold"] == pytest.approx(0.97)


def test_abort_on_breach_rolls_back_the_updated_devices(field: Callable[..., Field]) -> None:
    f = field(6)
    rid = start(f, on_breach="abort")
    f.tick(1)
    (canary,) = f.settle_wave(rid, healthy=False)
    f.telemetry([canary], latency=0.02)
    f.tick(1)
    assert f.rollout(rid).state == "aborted"
    assert wait_for(lambda: len(f.inbox[canary]) == 2)
    rollback = f.inbox[canary][-1]
    assert isinstance(rollback, RollbackCommand)
    assert rollback.target_version == 1
    assert f.rows(rid)[canary].state == "rolling_back"
    f.answer(canary, "rolled_back")
    f.tick(1)
    assert f.rows(rid)[canary].state == "rolled_back"
    assert f.commands() == 2  # nobody else was touched


def test_pause_resume_and_abort_by_the_operator(field: Callable[..., Field]) -> None:
    f = field(6)
    rid = start(f)
    f.tick(1)
    f.settle_wave(rid)
    f.rollouts.pause(rid)
    f.tick(1)
    assert f.rollout(rid).current_wave == 0  # paused: the next wave waits
    with pytest.raises(ConflictError):
        f.rollouts.pause(rid)
    f.rollouts.resume(rid)
    f.now += dt.timedelta(seconds=1)
    f.settle_wave(rid)  # fresh evidence after the resume (nothing new is in progress: plant it)
    f.telemetry([d for d, r in f.rows(rid).items() if r.state == "active"])
    f.tick(1)
    assert f.rollout(rid).current_wave == 1
    wave1 = f.settle_wave(rid)
    _, rollbacks = f.rollouts.abort(rid, reason="changed my mind")
    assert rollbacks == 1  # the canary; wave 1's answers are read on the next step
    f.tick(1)
    assert f.rollout(rid).state == "aborted"
    moved = [*wave1, *(d for d, r in f.rows(rid).items() if r.wave == 0)]
    assert wait_for(lambda: all(len(f.inbox[d]) == 2 for d in moved))
    assert all(isinstance(f.inbox[d][-1], RollbackCommand) for d in moved)
    for device_id in moved:
        f.answer(device_id, "rolled_back")
    f.tick(1)
    assert {r.state for r in f.rows(rid).values()} == {"rolled_back"}
    with pytest.raises(ConflictError):
        f.rollouts.resume(rid)


def test_a_silent_device_times_out_and_counts_as_failed(field: Callable[..., Field]) -> None:
    f = field(4)
    rid = start(f, plan=WavePlan(canary="2", device_timeout_s=30))
    f.tick(1)
    assert wait_for(lambda: f.commands() == 2)
    quiet, talking = sorted(f.inbox)
    f.answer(talking, "active")
    f.telemetry([talking])
    f.tick(10)
    assert f.rows(rid)[quiet].state == "in_progress"
    f.tick(31)
    row = f.rows(rid)[quiet]
    assert row.state == "timed_out"
    with f.db.reading() as session:
        job = session.get(DeploymentJob, row.job_id)
    assert job is not None
    assert (job.state, job.result_code) == ("failed", "timeout")
    breach = json.loads(f.rollout(rid).breach_json or "{}")
    assert [g["name"] for g in breach["gates"]] == ["job_failure_rate"]  # 1 of 2 > 20 %


def test_late_and_returning_devices_get_the_current_model(field: Callable[..., Field]) -> None:
    f = field(4)
    f.set_devices(["pi-03"], online=False)
    rid = start(f, plan=WavePlan(canary="3", device_timeout_s=60))
    f.tick(1)
    f.settle_wave(rid)
    f.tick(1)
    assert f.rollout(rid).state == "completed"
    assert "pi-03" not in f.rows(rid)
    Registry(f.db).register_devices(["pi-new"], class_name="rpi4", fleet=f.fleet)
    f.set_devices(["pi-03", "pi-new"], online=True)
    assert f.engine.on_device_online("pi-new", now=f.now) == 1
    f.tick(1)  # the returning one is picked up by the tick
    assert wait_for(lambda: len(f.inbox["pi-new"]) == 1 and len(f.inbox["pi-03"]) == 1)
    assert f.inbox["pi-new"][0].manifest.manifest.version == 2  # type: ignore[union-attr]
    f.answer("pi-new", "active")
    f.answer("pi-03", "active")
    f.tick(1)
    assert {r.state for r in f.rows(rid).values()} == {"active"}
    f.tick(1)
    assert f.commands() == 5  # nothing sent twice


def test_operator_errors_are_clear(field: Callable[..., Field]) -> None:
    f = field(2)
    with pytest.raises(NotFoundError, match="artifact 'rpi4:9' does not exist"):
        f.rollouts.start("rpi4:9")
    with pytest.raises(RegistryError, match="not x86"):
        f.rollouts.start("rpi4:2", class_name="x86")
    with pytest.raises(RegistryError, match="on-breach"):
        f.rollouts.start("rpi4:2", on_breach="explode")
    rid = start(f)
    with pytest.raises(ConflictError, match=f"rollout {rid}"):
        start(f)
    with pytest.raises(NotFoundError):
        f.rollouts.abort(999)
    with pytest.raises(RegistryError, match="unknown gate"):
        f.rollouts.resume(rid, waive=["vibes"])
    with f.db.reading() as session:
        assert session.exec(select(Rollout).where(col(Rollout.id) != rid)).first() is None


def test_a_rollout_on_each_database(database: Database, mqtt_broker: object, tmp_path: Path, tiny_onnx: Path) -> None:
    """SQLite and PostgreSQL: waves to completion, then a second rollout aborted with a rollback."""
    f = Field(database, mqtt_broker, tmp_path, tiny_onnx, 4)
    try:
        rid = start(f)
        for _ in range(5):
            f.tick(1)
            if f.rollout(rid).state == "completed":
                break
            f.settle_wave(rid)
        assert f.rollout(rid).state == "completed"
        assert {r.state for r in f.rows(rid).values()} == {"active"}
        Registry(database).add_model("other", source="test", task="classification")
        catalog = ArtifactCatalog(
            database, store=ArtifactStore(tmp_path / "store"), signing_key=Ed25519PrivateKey.generate()
        )
        catalog.add_from_onnx("other", class_name="rpi4", onnx_path=tiny_onnx)
        second = f.rollouts.start("rpi4:3", plan=WavePlan(canary="2"), gates=FAST_GATES, on_breach="abort").id or 0
        f.tick(1)
        assert wait_for(lambda: sum(len(v) for v in f.inbox.values()) == 6)
        f.rollouts.abort(second)
        f.tick(1)
        assert {r.state for r in f.rows(second).values()} == {"in_progress"}  # they may still answer
        for device_id in f.rows(second):
            f.answer(device_id, "failed", result=3)
        f.tick(1)
        assert {r.state for r in f.rows(second).values()} == {"failed"}
    finally:
        f.close()


def test_waves_wait_for_their_own_telemetry_and_for_an_online_canary(field: Callable[..., Field]) -> None:
    f = field(4)
    f.set_devices(f.ids, online=False)
    rid = start(f, gates=FAST_GATES.model_copy(update={"data_wait_s": 120}))
    f.tick(1)
    assert (f.rollout(rid).state, f.rows(rid)) == ("running", {})  # nobody online: no canary, not completed
    f.set_devices(f.ids, online=True)
    f.tick(1)
    f.settle_wave(rid)
    f.tick(1)
    wave1 = f.settle_wave(rid, healthy=False)  # active, but silent so far
    f.tick(1)
    rollout = f.rollout(rid)
    assert rollout.current_wave == 1
    latency = next(g for g in json.loads(rollout.gate_results_json)["gates"] if g["name"] == "latency_p95")
    assert latency["status"] == "waiting"
    assert "wave 1" in latency["detail"]
    f.tick(121)  # still silent after data_wait_s: that is a breach
    assert f.rollout(rid).state == "paused"
    f.rollouts.resume(rid)
    f.telemetry(wave1)
    f.tick(1)
    assert f.rollout(rid).current_wave == 2


def test_a_waiting_gate_names_the_silent_devices_and_why(field: Callable[..., Field]) -> None:
    f = field(4)
    with f.db.transaction() as session:
        for device in session.exec(select(Device)).all():
            device.first_seen = f.now
            session.add(device)
    rid = start(f, plan=WavePlan(canary="4", growth=2, max_concurrent=10, device_timeout_s=600),
                gates=FAST_GATES.model_copy(update={"min_devices": 3}))  # fmt: skip
    f.tick(1)
    f.tick(1)
    assert wait_for(lambda: all(f.inbox[d] for d in f.ids))
    for device_id in ("pi-00", "pi-01", "pi-02"):
        f.answer(device_id, "active")
    f.telemetry(["pi-00"])  # infers with labels
    f.telemetry(["pi-01"], labelled=0, correct=0)  # infers, no labels
    f.set_devices(["pi-02"], online=False)  # went offline after installing
    f.tick(1)
    gates = {g["name"]: g for g in json.loads(f.rollout(rid).gate_results_json)["gates"]}
    accuracy, latency = gates["accuracy"], gates["latency_p95"]
    assert accuracy["status"] == latency["status"] == "waiting"
    assert "1 inferring without labels" in accuracy["detail"]
    assert "a simulated device needs --dataset): pi-01" in accuracy["detail"]
    assert "1 offline: pi-02" in accuracy["detail"]
    assert "1 offline: pi-02" in latency["detail"]
    assert "pi-01" not in latency["detail"]  # it reports inferences: the latency gate has its samples
    assert "installing v2: pi-03" in latency["detail"]  # it got its command, has not answered
    f.set_devices(["pi-03"], online=False)
    f.tick(1)
    latency = next(g for g in json.loads(f.rollout(rid).gate_results_json)["gates"] if g["name"] == "latency_p95")
    assert "offline, v2 not installed yet: pi-03" in latency["detail"]
    with f.db.transaction() as session:
        device = session.get(Device, "pi-03")
        assert device is not None
        device.first_seen = None
        session.add(device)
    f.tick(1)
    latency = next(g for g in json.loads(f.rollout(rid).gate_results_json)["gates"] if g["name"] == "latency_p95")
    assert "never connected (check the device's fleet, broker address and password): pi-03" in latency["detail"]
