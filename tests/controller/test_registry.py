"""Registry, artifact catalog and rollups on SQLite, and on PostgreSQL where one answers."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import SQLModel, select

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.credentials import verify_secret
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import AuditEntry, Device, TelemetryRollup
from edgefleet.controller.errors import ConflictError, DatabaseUnavailableError, NotFoundError, RegistryError
from edgefleet.controller.service.rollups import RollupAggregator
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.signing import key_id, public_key_of, verify_manifest
from edgefleet.protocols.telemetry import TelemetryBatch


@pytest.fixture
def reg(database: Database, profiles: Path) -> Registry:
    registry = Registry(database, actor="tester")
    registry.ensure_fleet("default")
    registry.add_class(load_profile(profiles / "rpi4.toml"))
    return registry


def test_migrations_create_exactly_the_tables(database: Database) -> None:
    with database.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []
    database.migrate()  # idempotent


def test_devices_register_all_or_nothing_and_keep_only_hashes(reg: Registry) -> None:
    creds = reg.register_devices(["a-1", "a-2"], class_name="rpi4", fleet="default")
    device = reg.get_device("a-1")
    assert device.credential_hash.startswith("$7$")
    assert creds[0].password not in device.credential_hash
    assert verify_secret(creds[0].password, device.credential_hash)
    with pytest.raises(ConflictError, match="a-2"):
        reg.register_devices(["a-3", "a-2"], class_name="rpi4", fleet="default")
    assert [d.id for d in reg.list_devices()] == ["a-1", "a-2"]  # a-3 was not half-written
    with pytest.raises(NotFoundError, match="class 'nope'"):
        reg.register_devices(["b-1"], class_name="nope", fleet="default")
    with pytest.raises(RegistryError, match="not valid"):
        reg.register_devices(["bad/id"], class_name="rpi4", fleet="default")
    with pytest.raises(RegistryError, match="controller"):
        reg.register_devices(["edgefleet-controller"], class_name="rpi4", fleet="default")
    assert [e.action for e in reg.audit_log()][:2] == ["device.register", "class.add"]


def test_listing_and_lookups(reg: Registry) -> None:
    reg.register_devices(["a-1"], class_name="rpi4", fleet="default")
    assert [(f.name, n) for f, n in reg.list_fleets()] == [("default", 1)]
    assert [(c.name, n) for c, n in reg.list_classes()] == [("rpi4", 1)]
    assert reg.get_class("rpi4")[1].threads == 4
    assert reg.list_devices(online=True) == []
    with pytest.raises(NotFoundError):
        reg.get_device("ghost")
    with pytest.raises(ConflictError):
        reg.create_fleet("default")


def test_artifact_versions_only_grow_and_manifests_verify(reg: Registry, tmp_path: Path, onnx_factory) -> None:
    key = Ed25519PrivateKey.generate()
    catalog = ArtifactCatalog(reg.db, store=ArtifactStore(tmp_path / "store"), signing_key=key)
    reg.add_model("tiny", source="onnx:tiny.onnx", task="classification")
    onnx = onnx_factory(tmp_path / "m.onnx")
    results: list[int] = []
    errors: list[Exception] = []

    def add() -> None:
        try:
            results.append(catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx).version)
        except RegistryError as exc:  # SQLite may report a busy writer; it must say so, not corrupt anything
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, DatabaseUnavailableError) for e in errors)
    assert sorted(results) == list(range(1, len(results) + 1))
    latest = catalog.get(f"rpi4:{len(results)}")
    assert reg.get_class("rpi4")[0].last_version == len(results)
    public = public_key_of(key)
    manifest = verify_manifest(
        catalog.signed_manifest(latest), trusted_keys={key_id(public): public}, now=latest.created_at,
        current_version=len(results) - 1,
    )  # fmt: skip
    assert manifest.sha256 == latest.sha256
    assert catalog.store.verify(latest.sha256)
    with pytest.raises(NotFoundError):
        catalog.add_from_onnx("other", class_name="rpi4", onnx_path=onnx)
    with pytest.raises(RegistryError, match="opset"):
        catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx_factory(tmp_path / "o.onnx", opset=21))


def _batch(seq: int, start: dt.datetime, latencies: int) -> TelemetryBatch:
    counts = [0] * 22
    counts[3] = latencies
    return TelemetryBatch.model_validate(
        {"session": "s", "seq": seq, "window_start": start, "window_end": start + dt.timedelta(seconds=5),
         "model_version": 2, "inference_count": latencies, "latency_counts": counts, "latency_sum_seconds": 0.001}
    )  # fmt: skip


def test_two_replicas_flushing_the_same_windows_add_up_exactly(reg: Registry) -> None:
    reg.register_devices(["a-1", "a-2"], class_name="rpi4", fleet="default")
    start = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    replicas = [RollupAggregator(window_s=60), RollupAggregator(window_s=60)]
    for i in range(50):
        for replica in replicas:
            replica.add("a-1", "rpi4", _batch(i, start, 2), received_at=start)
            replica.add("a-2", "rpi4", _batch(i, start, 1), received_at=start)
    threads = [threading.Thread(target=r.flush, args=(reg.db,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for replica in replicas:  # a replica whose flush met a busy database kept its data: flush again
        replica.flush(reg.db)
    with reg.db.reading() as session:
        rows = {r.device_id: r for r in session.exec(select(TelemetryRollup)).all()}
        seen = session.get(Device, "a-1")
    assert rows["a-1"].messages == 100
    assert rows["a-1"].inferences == 200
    assert json.loads(rows["a-1"].latency_counts_json)[3] == 200
    assert rows["a-2"].inferences == 100
    assert seen is not None
    assert seen.last_telemetry_at == start


def test_a_locked_database_fails_cleanly(tmp_path: Path, profiles: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path / 'r.db'}", timeout=0.2)
    db.migrate()
    reg = Registry(db)
    reg.ensure_fleet("default")
    blocker = db.engine.raw_connection()
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseUnavailableError, match="locked"):
            reg.add_class(load_profile(profiles / "rpi4.toml"))
    finally:
        blocker.rollback()
        blocker.close()
    with db.reading() as session:
        assert [e.action for e in session.exec(select(AuditEntry)).all()] == ["fleet.create"]


def test_an_unreachable_database_says_so() -> None:
    from edgefleet.controller.broker.mosquitto import free_port

    db = Database.open(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none", timeout=1)
    with pytest.raises(DatabaseUnavailableError, match="cannot use the registry database"):
        db.migrate()


def test_rollups_older_than_the_retention_are_pruned(reg: Registry) -> None:
    reg.register_devices(["a-1"], class_name="rpi4", fleet="default")
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    agg = RollupAggregator(window_s=60, retention=dt.timedelta(days=1), clock=lambda: now)
    agg.add("a-1", "rpi4", _batch(0, now - dt.timedelta(days=2), 1), received_at=now)
    agg.add("a-1", "rpi4", _batch(1, now - dt.timedelta(hours=1), 1), received_at=now)
    assert agg.flush(reg.db) == 2
    with reg.db.reading() as session:
        windows = [r.window_start for r in session.exec(select(TelemetryRollup)).all()]
    assert windows == [now - dt.timedelta(hours=1)]
