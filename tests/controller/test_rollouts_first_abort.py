"""Aborting a first rollout (issue 13, item 5): the devices had no model before, so there is nothing to go back to.

Real agents (the fleet simulator) on a real broker take version 1 as their first model; the operator aborts while
they run it. Every device row must end final with the reason in words (`rollout status --watch` returns once the
rollout and its rows are final), each rollback job must be closed (never left `sent`) with result
`no_previous_model`, and the devices keep running version 1: there is no model to go back to.

The engine tests below need no broker (a recording publisher): a first model's rows end at the abort itself, even
for an offline device, with no command sent; a device that answers a rollback `no_previous_model` (the registry
thought it had a previous model) ends its row the same way; an event with a result code this controller does not
know is one counted rejection.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from sqlmodel import col, select
from waiting import wait_for

from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.keys import load_signing_key, public_raw
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.states import FINAL_ROW_STATES
from edgefleet.controller.data.tables import DeploymentJob, Device, RolloutDevice
from edgefleet.controller.rollout.api import Rollouts
from edgefleet.controller.rollout.engine import RolloutEngine
from edgefleet.controller.rollout.metrics import outcome_of
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.controller.rollout.status import describe
from edgefleet.controller.service.app import ControllerApp, device_state_counts, job_state_counts
from edgefleet.controller.service.handlers import ControllerService
from edgefleet.controller.service.metrics import ControllerMetrics
from edgefleet.controller.service.state_updates import apply_job_event
from edgefleet.protocols.codec import decode_command
from edgefleet.protocols.codes import ResultCode
from edgefleet.protocols.commands import DeployCommand, RollbackCommand
from edgefleet.protocols.messages import JobEvent
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.signing import key_id
from edgefleet.protocols.topics import events_topic, parse_topic

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
N = 3
WAITING_GATES = GateConfig(min_devices=1, data_wait_s=3600)  # no telemetry comes: the rollout stays running


@pytest.mark.mqtt
@pytest.mark.slow
def test_aborting_a_first_rollout_closes_every_rollback_and_keeps_the_model(
    cli, mqtt_broker, tmp_path: Path, tiny_onnx: Path, serving_home: Callable[..., tuple[str, Any]]
) -> None:
    fleet, settings = serving_home(cli, mqtt_broker, tiny_onnx, devices=N, artifacts=1)
    ids = [f"{fleet}-{i:05d}" for i in range(N)]
    host, port = mqtt_broker.host, mqtt_broker.port
    app = ControllerApp(settings, rollout_interval_s=0.2)
    app.start(metrics_server=False)
    stop = threading.Event()
    public = public_raw(load_signing_key(settings.key_path))
    spec = SimulatorSpec(
        devices=N, profile=load_profile(PROFILES / "rpi4.toml"), data_root=tmp_path / "sim", fleet=fleet,
        host=host, port=port, id_prefix=fleet, trusted_keys={key_id(public): public},
        telemetry_window_s=0.5, probation_s=0.2,
    )  # fmt: skip
    sim = FleetSimulator(spec)
    simulating = threading.Thread(target=lambda: sim.run(until=stop.is_set))
    rollouts = Rollouts(app.db)
    try:
        sim.start()
        simulating.start()
        assert wait_for(lambda: sim.connected == N, 20)
        assert sim.summary().versions == {None: N}  # a first rollout: no device runs a model yet
        # The devices do not infer, so the gates wait for samples: the rollout stays running with every device active.
        first = rollouts.start("rpi4:1", plan=WavePlan(canary=str(N)), gates=WAITING_GATES).id or 0
        assert rollouts.get(first).previous_version is None
        assert wait_for(lambda: describe(app.db, first)["totals"] == {"active": N}, 60), describe(app.db, first)
        assert wait_for(lambda: sim.summary().versions == {1: N}, 10), sim.summary()
        rollouts.abort(first, reason="operator changed their mind")

        # `rollout status --watch` returns when the rollout and every row are final: that must happen, promptly.
        assert wait_for(lambda: describe(app.db, first)["unfinished_devices"] == 0, 30), describe(app.db, first)
        view = describe(app.db, first)
        assert view["state"] == "aborted"
        assert view["totals"] == {"no_previous_model": N}, view["totals"]
        with app.db.reading() as session:
            rows = list(session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == first)).all())
            assert all(r.state in FINAL_ROW_STATES for r in rows), [(r.device_id, r.state) for r in rows]
            for row in rows:
                assert "no previous model: the device keeps v1" in (row.detail or ""), row.detail
            rollback_ids = [r.rollback_job_id for r in rows]
            assert None not in rollback_ids
            jobs = list(session.exec(select(DeploymentJob).where(col(DeploymentJob.id).in_(rollback_ids))).all())
        assert len(jobs) == N
        for job in jobs:  # closed, not `sent` forever
            assert (job.state, job.result_code) == ("failed", "no_previous_model"), (job.state, job.result_code)
            assert job.finished_at is not None
            assert "keeps running v1" in (job.detail or ""), job.detail
        # the reason is in the status view in words, per device
        notes = {n["device"]: n for n in view["device_notes"]}
        assert set(notes) == set(ids)
        assert all(n["state"] == "no_previous_model" and "keeps" in n["detail"] for n in notes.values()), notes
        # `rollout status --watch` returns (nothing is left to wait for) and exits 3: the rollout was aborted
        watched = cli("rollout", "status", str(first), "--watch", "--json", "--interval", "0.1")
        assert watched.exit_code == 3, watched.output
        last = json.loads(watched.stdout.strip().splitlines()[-1])
        assert (last["totals"], last["unfinished_devices"]) == ({"no_previous_model": N}, 0)
        # `device show` gives the same reason for the device's last job
        shown = cli.json("device", "show", ids[0])
        assert shown["jobs"][0]["result_code"] == "no_previous_model", shown["jobs"]
        # the devices keep version 1: nothing else to run
        assert sim.summary().versions == {1: N}
    finally:
        stop.set()
        if simulating.is_alive():
            simulating.join(10)
        sim.stop()
        app.stop()


class Recorder:
    """A publisher that keeps what the engine sends, by device."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, DeployCommand | RollbackCommand]] = []

    def publish(self, topic: str, payload: bytes, **_: object) -> None:
        command = decode_command(payload)
        assert isinstance(command, DeployCommand | RollbackCommand)
        device = parse_topic(topic).device
        assert device is not None
        self.sent.append((device, command))


class Field:
    """A registry with devices of class rpi4 on `version` (None: no model yet), artifacts v1..vN, the engine."""

    def __init__(self, db: Database, tmp: Path, onnx: Path, *, artifacts: int, version: int | None) -> None:
        self.db = db
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        registry = Registry(db)
        registry.create_fleet("default")
        registry.add_class(load_profile(PROFILES / "rpi4.toml"))
        self.ids = [f"pi-{i}" for i in range(N)]
        registry.register_devices(self.ids, class_name="rpi4", fleet="default")
        registry.add_model("tiny", source="test", task="classification")
        catalog = ArtifactCatalog(db, store=ArtifactStore(tmp / "store"), signing_key=Ed25519PrivateKey.generate())
        for _ in range(artifacts):
            catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx)
        with db.transaction() as session:
            for device in session.exec(select(Device)).all():
                device.online, device.connected_at, device.model_version = True, self.now, version
                session.add(device)
        self.publisher = Recorder()
        self.engine = RolloutEngine(db, publisher=self.publisher)
        self.rollouts = Rollouts(db, clock=lambda: self.now)

    def tick(self, seconds: float = 1.0) -> None:
        self.now += dt.timedelta(seconds=seconds)
        self.engine.tick(self.now)

    def answer(self, device_id: str, state: str, *, result: ResultCode = ResultCode.OK, detail: str = "") -> None:
        """The device answers the last command it got."""
        command = next(c for d, c in reversed(self.publisher.sent) if d == device_id)
        event = JobEvent(
            job_id=command.job_id, state=state, result=result, detail=detail, timestamp=self.now, model_version=None
        )
        assert apply_job_event(self.db, device_id, event, now=self.now)

    def rows(self, rollout_id: int) -> dict[str, RolloutDevice]:
        with self.db.reading() as session:
            found = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all()
            return {r.device_id: r for r in found}

    def job(self, job_id: str | None) -> DeploymentJob:
        with self.db.reading() as session:
            job = session.get(DeploymentJob, job_id or "")
        assert job is not None
        return job

    def activate_all(self, artifact: str) -> int:
        rid = self.rollouts.start(artifact, plan=WavePlan(canary=str(N)), gates=WAITING_GATES).id or 0
        self.tick()
        assert len(self.publisher.sent) == N
        for device_id in self.ids:
            self.answer(device_id, "active")
        self.tick()
        assert {r.state for r in self.rows(rid).values()} == {"active"}
        return rid


def test_a_first_models_rows_end_at_the_abort_with_nothing_sent(database: Database, tmp_path: Path, tiny_onnx: Path):
    f = Field(database, tmp_path, tiny_onnx, artifacts=1, version=None)
    rid = f.activate_all("rpi4:1")
    with database.transaction() as session:  # one device went offline: it does not matter, nothing is sent
        device = session.get(Device, "pi-0")
        assert device is not None
        device.online = False
        session.add(device)
    _, rollbacks = f.rollouts.abort(rid, reason="operator")
    assert rollbacks == 0  # nothing to roll back: none of the devices had a model before
    rows = f.rows(rid)  # final at the abort itself, before the engine's next step
    assert {r.state for r in rows.values()} == {"no_previous_model"}
    for row in rows.values():
        assert row.detail == "no previous model: the device keeps v1 (it ran no model before this rollout)"
        job = f.job(row.rollback_job_id)
        assert (job.state, job.result_code) == ("failed", "no_previous_model")
        assert job.finished_at is not None
        assert "no previous model to go back to" in (job.detail or "")
    sent = len(f.publisher.sent)
    f.tick()
    f.tick()
    assert len(f.publisher.sent) == sent  # no rollback command goes out
    view = describe(database, rid)
    assert (view["state"], view["unfinished_devices"], view["totals"]) == ("aborted", 0, {"no_previous_model": N})
    assert [n["device"] for n in view["device_notes"]] == f.ids
    assert outcome_of("no_previous_model") == "active"  # metrics: the device still runs the rollout's model


def test_a_device_active_after_the_abort_of_its_first_model_is_kept(
    database: Database, tmp_path: Path, tiny_onnx: Path
) -> None:
    f = Field(database, tmp_path, tiny_onnx, artifacts=1, version=None)
    rid = f.rollouts.start("rpi4:1", plan=WavePlan(canary=str(N)), gates=WAITING_GATES).id or 0
    f.tick()
    f.rollouts.abort(rid, reason="operator")  # all still in progress: each finishes its deploy first
    for device_id in f.ids:
        f.answer(device_id, "active")
    f.tick()
    rows = f.rows(rid)
    assert {r.state for r in rows.values()} == {"no_previous_model"}
    assert all(isinstance(c, DeployCommand) for _, c in f.publisher.sent)
    assert describe(database, rid)["unfinished_devices"] == 0


def test_a_device_that_answers_no_previous_model_ends_its_row(
    database: Database, tmp_path: Path, tiny_onnx: Path
) -> None:
    f = Field(database, tmp_path, tiny_onnx, artifacts=2, version=1)  # the registry says: v1 before, v2 now
    rid = f.activate_all("rpi4:2")
    _, rollbacks = f.rollouts.abort(rid, reason="operator")
    assert rollbacks == N
    f.tick()
    rollbacks_sent = [(d, c) for d, c in f.publisher.sent if isinstance(c, RollbackCommand)]
    assert len(rollbacks_sent) == N
    assert {c.target_version for _, c in rollbacks_sent} == {1}
    said = "no previous model of v1 to go back to: the previous slot holds v3; this device keeps running v2"
    f.answer("pi-0", "failed", result=ResultCode.NO_PREVIOUS_MODEL, detail=said)
    f.answer("pi-1", "rolled_back")
    f.answer("pi-2", "failed", result=ResultCode.INSTALL_FAILED, detail="disk full")
    f.tick()
    rows = f.rows(rid)
    assert {d: r.state for d, r in rows.items()} == {
        "pi-0": "no_previous_model", "pi-1": "rolled_back", "pi-2": "rollback_failed"
    }  # fmt: skip
    assert rows["pi-0"].detail == f"no previous model: the device keeps v2 ({said})"
    job = f.job(rows["pi-0"].rollback_job_id)
    assert (job.state, job.result_code, job.detail) == ("failed", "no_previous_model", said)
    view = describe(database, rid)
    assert view["unfinished_devices"] == 0
    notes = {n["device"]: (n["state"], n["detail"]) for n in view["device_notes"]}
    assert notes["pi-0"] == ("no_previous_model", rows["pi-0"].detail)
    assert notes["pi-2"][0] == "rollback_failed"


def test_a_result_code_this_controller_does_not_know_is_one_counted_rejection(tmp_path: Path) -> None:
    """What an older controller does with a newer agent's code: reject the event, count it, keep going."""
    db = Database.open(f"sqlite:///{tmp_path / 'registry.db'}", timeout=1)
    db.migrate()
    registry = Registry(db)
    registry.ensure_fleet("default")
    registry.add_class(load_profile(PROFILES / "rpi4.toml"))
    registry.register_devices(["pi-1"], class_name="rpi4", fleet="default")
    prometheus = CollectorRegistry()
    metrics = ControllerMetrics(
        registry=prometheus, device_states=device_state_counts(db), job_states=job_state_counts(db)
    )
    service = ControllerService(db, metrics=metrics, fleet="default", window_s=60)
    unknown = max(ResultCode) + 1
    payload = {"schema": 1, "job_id": "job-1", "state": "failed", "result": unknown, "detail": "from the future",
               "timestamp": "2026-11-29T12:00:00Z"}  # fmt: skip
    service.handle(events_topic("default", "pi-1"), json.dumps(payload).encode())  # never raises
    labels = {"kind": "events", "reason": "schema"}
    assert prometheus.get_sample_value("edgefleet_messages_rejected_total", labels) == 1
    db.dispose()
