"""The message handlers without a broker: telemetry into metrics and rollups, state messages, rejections."""

from __future__ import annotations

import datetime as dt
import json
import types
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from sqlmodel import select

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import DeploymentJob, Device, TelemetryRollup
from edgefleet.controller.service.app import device_state_counts, job_state_counts
from edgefleet.controller.service.handlers import ControllerService
from edgefleet.controller.service.metrics import ControllerMetrics
from edgefleet.protocols.blocks import Bitmap, BlockRequest
from edgefleet.protocols.codec import encode
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.topics import (
    birth_topic,
    block_request_topic,
    command_topic,
    events_topic,
    status_topic,
    telemetry_topic,
)

LABELS = {"device_class": "rpi4", "model": "tiny", "model_version": "1"}


@pytest.fixture
def sqlite_db(tmp_path: Path, profiles: Path) -> Database:
    db = Database.open(f"sqlite:///{tmp_path / 'registry.db'}", timeout=1)
    db.migrate()
    reg = Registry(db)
    reg.ensure_fleet("default")
    reg.add_class(load_profile(profiles / "rpi4.toml"))
    reg.add_class(load_profile(profiles / "x86-gateway.toml"))
    reg.register_devices(["pi-1", "pi-2"], class_name="rpi4", fleet="default")
    reg.register_devices(["gw-1"], class_name="x86-gateway", fleet="default")
    return db


@pytest.fixture
def service(sqlite_db: Database) -> tuple[ControllerService, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = ControllerMetrics(
        registry=registry, device_states=device_state_counts(sqlite_db), job_states=job_state_counts(sqlite_db)
    )
    return ControllerService(sqlite_db, metrics=metrics, fleet="default", window_s=60), registry


def rejected(registry: CollectorRegistry, kind: str, reason: str) -> float:
    return registry.get_sample_value("edgefleet_messages_rejected_total", {"kind": kind, "reason": reason}) or 0.0


def test_scripted_telemetry_gives_exact_histogram_and_rollups(service, wire: types.SimpleNamespace) -> None:
    svc, registry = service
    svc.handle(telemetry_topic("default", "pi-1"), wire.telemetry(0, latencies=(0.0009, 0.002, 0.004)))
    svc.handle(telemetry_topic("default", "pi-1"), wire.telemetry(1, latencies=(0.0009,), labelled=4, correct=3))
    svc.handle(
        telemetry_topic("default", "pi-2"),
        wire.telemetry(0, latencies=(20.0,), confidence=0.5, errors={"inference": 2}),
    )
    value = registry.get_sample_value
    assert value("edgefleet_inference_latency_seconds_count", LABELS) == 5
    assert value("edgefleet_inference_latency_seconds_sum", LABELS) == pytest.approx(0.0009 * 2 + 0.006 + 20.0)
    assert value("edgefleet_inference_latency_seconds_bucket", {**LABELS, "le": "0.001"}) == 2
    assert value("edgefleet_inference_latency_seconds_bucket", {**LABELS, "le": "0.002"}) == 3
    assert value("edgefleet_inference_latency_seconds_bucket", {**LABELS, "le": "10"}) == 4
    assert value("edgefleet_inference_latency_seconds_bucket", {**LABELS, "le": "+Inf"}) == 5
    assert value("edgefleet_model_accuracy_ratio", LABELS) == pytest.approx(0.75)
    assert value("edgefleet_top1_confidence_mean", LABELS) == pytest.approx(0.5)
    assert value("edgefleet_device_errors_total", {**LABELS, "kind": "inference"}) == 2
    assert value("edgefleet_messages_accepted_total", {"kind": "telemetry"}) == 3
    assert value("edgefleet_devices", {"device_class": "rpi4", "state": "offline"}) == 2

    assert svc.flush() == 3
    with svc.db.reading() as session:
        rows = {r.device_id: r for r in session.exec(select(TelemetryRollup)).all()}
        device = session.get(Device, "pi-1")
    assert rows["pi-1"].messages == 2
    assert rows["pi-1"].inferences == 4
    assert rows["pi-1"].labelled == 4
    assert rows["pi-1"].correct == 3
    assert sum(json.loads(rows["pi-1"].latency_counts_json)) == 4
    assert rows["pi-2"].errors == 2
    assert device is not None
    assert device.last_telemetry_at is not None

    # A second flush into the same window adds up (what another replica's flush does too).
    svc.handle(telemetry_topic("default", "pi-1"), wire.telemetry(2, latencies=(0.002,)))
    assert svc.flush() == 1
    with svc.db.reading() as session:
        row = session.exec(select(TelemetryRollup).where(TelemetryRollup.device_id == "pi-1")).one()
    assert row.messages == 3
    assert sum(json.loads(row.latency_counts_json)) == 5


def test_bad_messages_are_counted_by_reason_and_never_stop_the_loop(service, wire) -> None:
    svc, registry = service
    topic = telemetry_topic("default", "pi-1")
    svc.handle(topic, b"\xff\xfe not json")
    svc.handle(topic, b'{"schema": 1, "seq": "x"}')
    svc.handle(topic, b"{" * 20_000)
    svc.handle(topic, wire.telemetry(0).replace(b'"schema":1', b'"schema":9'))
    svc.handle(telemetry_topic("default", "ghost-7"), wire.telemetry(0))
    svc.handle("edgefleet/v1/default/device/pi-1/unknown", b"{}")
    svc.handle("not/an/edgefleet/topic", b"{}")
    svc.handle(command_topic("default", "pi-1"), b"{}")
    svc.handle(topic, wire.telemetry(5))
    svc.handle(topic, wire.telemetry(5))  # a QoS 1 redelivery
    svc.handle(telemetry_topic("other", "pi-1"), wire.telemetry(6))
    assert rejected(registry, "telemetry", "decode") == 1
    assert rejected(registry, "telemetry", "schema") == 1
    assert rejected(registry, "telemetry", "oversize") == 1
    assert rejected(registry, "telemetry", "unsupported_schema") == 1
    assert rejected(registry, "telemetry", "unknown_device") == 1
    assert rejected(registry, "unknown", "topic") == 2
    assert rejected(registry, "command", "topic") == 1
    assert rejected(registry, "telemetry", "duplicate") == 1
    assert rejected(registry, "telemetry", "wrong_fleet") == 1
    assert registry.get_sample_value("edgefleet_messages_accepted_total", {"kind": "telemetry"}) == 1
    assert svc.flush() == 1


def test_telemetry_of_another_class_model_is_rejected(service, wire, tmp_path: Path, onnx_factory) -> None:
    svc, registry = service
    catalog = ArtifactCatalog(svc.db, store=ArtifactStore(tmp_path / "store"), signing_key=Ed25519PrivateKey.generate())
    Registry(svc.db).add_model("tiny", source="onnx:tiny.onnx", task="classification")
    artifact = catalog.add_from_onnx("tiny", class_name="x86-gateway", onnx_path=onnx_factory(tmp_path / "m.onnx"))
    svc.handle(telemetry_topic("default", "pi-1"), wire.telemetry(0, digest=artifact.sha256))
    svc.handle(telemetry_topic("default", "gw-1"), wire.telemetry(0, digest=artifact.sha256))
    svc.handle(birth_topic("default", "pi-1"), wire.birth(device_class="x86-gateway"))
    assert rejected(registry, "telemetry", "wrong_class") == 1
    assert rejected(registry, "birth", "wrong_class") == 1
    assert registry.get_sample_value("edgefleet_messages_accepted_total", {"kind": "telemetry"}) == 1


def test_birth_status_and_late_last_will(service, wire) -> None:
    svc, registry = service
    later = wire.T0 + dt.timedelta(minutes=5)
    svc.handle(birth_topic("default", "pi-1"), wire.birth(version=3, when=later))
    svc.handle(status_topic("default", "pi-1"), wire.status("offline", when=wire.T0))  # an older connection's will
    device = Registry(svc.db).get_device("pi-1")
    assert device.online
    assert device.model_version == 3
    assert json.loads(device.slot_state or "{}")["active"] == "a"
    assert registry.get_sample_value("edgefleet_devices", {"device_class": "rpi4", "state": "online"}) == 1
    svc.handle(status_topic("default", "pi-1"), wire.status("offline", when=later))
    assert not Registry(svc.db).get_device("pi-1").online
    assert registry.get_sample_value("edgefleet_messages_accepted_total", {"kind": "status"}) == 2


def test_job_events_update_jobs_and_devices(service, wire, tmp_path: Path, onnx_factory) -> None:
    svc, registry = service
    catalog = ArtifactCatalog(svc.db, store=ArtifactStore(tmp_path / "s"), signing_key=Ed25519PrivateKey.generate())
    Registry(svc.db).add_model("tiny", source="onnx:tiny.onnx", task="classification")
    artifact = catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx_factory(tmp_path / "m.onnx"))
    with svc.db.transaction() as session:
        session.add(DeploymentJob(id="job1", device_id="pi-1", artifact_id=artifact.id or 0, state="sent"))
    svc.handle(events_topic("default", "pi-1"), wire.job_event("job1", "downloading"))
    svc.handle(events_topic("default", "pi-2"), wire.job_event("job1", "failed", result=4))  # not pi-2's job
    svc.handle(events_topic("default", "pi-1"), wire.job_event("job1", "active", version=1))
    assert rejected(registry, "events", "unknown_job") == 1
    with svc.db.reading() as session:
        job = session.get(DeploymentJob, "job1")
    assert job is not None
    assert job.state == "active"
    assert job.finished_at is not None
    assert Registry(svc.db).get_device("pi-1").model_version == 1
    assert registry.get_sample_value("edgefleet_jobs", {"state": "active"}) == 1


def test_block_requests_are_routed_to_the_hook(service) -> None:
    svc, registry = service
    seen = []
    svc.block_requests = lambda device, cls, request: seen.append((device, cls, request.block_count))
    request = BlockRequest.for_missing("b" * 64, Bitmap(3))
    svc.handle(block_request_topic("default", "pi-2"), encode(request))
    assert seen == [("pi-2", "rpi4", 3)]
    assert registry.get_sample_value("edgefleet_messages_accepted_total", {"kind": "block_request"}) == 1


def test_a_failed_flush_keeps_the_data(service, wire) -> None:
    svc, _ = service
    svc.handle(telemetry_topic("default", "pi-1"), wire.telemetry(0))
    blocker = svc.db.engine.raw_connection()
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        assert svc.flush() == 0
        assert svc.flush_errors == 1
    finally:
        blocker.rollback()
        blocker.close()
    assert svc.flush() == 1


def test_rejections_are_logged_once_per_sender_per_minute(service, caplog: pytest.LogCaptureFixture) -> None:
    svc, registry = service
    with caplog.at_level("WARNING", logger="edgefleet.controller.service.handlers"):
        for _ in range(5):
            svc.handle(telemetry_topic("default", "pi-1"), b"junk")
        svc.handle(telemetry_topic("default", "pi-2"), b"junk")
    assert rejected(registry, "telemetry", "decode") == 6
    senders = [r.getMessage().split(" from ")[1].split(" ")[0] for r in caplog.records]
    assert senders == ["pi-1", "pi-2"]
