"""The registry's tables (SQLModel). Alembic migrations in `migrations/versions` create exactly these.

Timestamps are timezone-aware UTC in Python on every backend (`UTCDateTime`); JSON documents (profiles,
recipes, metrics, manifests) are stored as text so SQLite and PostgreSQL hold the same bytes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

__all__ = [
    "Artifact",
    "AuditEntry",
    "ClassPolicy",
    "DeploymentJob",
    "Device",
    "DeviceClass",
    "Fleet",
    "Model",
    "Recompression",
    "Rollout",
    "RolloutDevice",
    "TelemetryRollup",
    "UTCDateTime",
    "utcnow",
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """A DateTime that always comes back timezone-aware (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the registry; use timezone-aware UTC")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)  # noqa: S101 - the column type guarantees it
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _when(*, nullable: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_type=UTCDateTime, nullable=True)
    return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class Fleet(SQLModel, table=True):
    __tablename__ = "fleets"

    name: str = Field(primary_key=True, max_length=64)
    created_at: dt.datetime = _when()


class DeviceClass(SQLModel, table=True):
    __tablename__ = "device_classes"

    name: str = Field(primary_key=True, max_length=64)
    profile_json: str = Field(sa_type=sa.Text)
    # The highest artifact version ever given to this class; only grows (no downgrade, no replay).
    last_version: int = Field(default=0)
    created_at: dt.datetime = _when()


class Device(SQLModel, table=True):
    __tablename__ = "devices"

    id: str = Field(primary_key=True, max_length=128)
    fleet: str = Field(foreign_key="fleets.name", index=True, max_length=64)
    class_name: str = Field(foreign_key="device_classes.name", index=True, max_length=64)
    credential_hash: str = Field(max_length=256)
    created_at: dt.datetime = _when()
    first_seen: dt.datetime | None = _when(nullable=True)
    last_seen: dt.datetime | None = _when(nullable=True)
    last_telemetry_at: dt.datetime | None = _when(nullable=True)
    # When the current (or last) connection started, from the device's birth/online status; a late
    # last-will "offline" from an older connection must not mark a reconnected device offline.
    connected_at: dt.datetime | None = _when(nullable=True)
    online: bool = Field(default=False, index=True)
    model_digest: str | None = Field(default=None, max_length=128)
    model_version: int | None = Field(default=None)
    slot_state: str | None = Field(default=None, sa_type=sa.Text)


class Model(SQLModel, table=True):
    __tablename__ = "models"

    name: str = Field(primary_key=True, max_length=128)
    source: str = Field(max_length=512)
    task: str = Field(max_length=64)
    file_sha256: str | None = Field(default=None, max_length=64)
    created_at: dt.datetime = _when()


class Artifact(SQLModel, table=True):
    __tablename__ = "artifacts"
    __table_args__ = (sa.UniqueConstraint("class_name", "version", name="uq_artifact_class_version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(foreign_key="models.name", index=True, max_length=128)
    class_name: str = Field(foreign_key="device_classes.name", index=True, max_length=64)
    version: int
    sha256: str = Field(max_length=64, index=True)
    size: int = Field(sa_type=sa.BigInteger)
    recipe_json: str = Field(default="{}", sa_type=sa.Text)
    metrics_json: str = Field(default="{}", sa_type=sa.Text)
    manifest_json: str = Field(default="{}", sa_type=sa.Text)
    signature: str = Field(default="", sa_type=sa.Text)
    key_id: str = Field(default="", max_length=64)
    created_at: dt.datetime = _when()


class DeploymentJob(SQLModel, table=True):
    __tablename__ = "deployment_jobs"

    id: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(foreign_key="devices.id", index=True, max_length=128)
    artifact_id: int = Field(foreign_key="artifacts.id", index=True)
    state: str = Field(max_length=32, index=True)
    result_code: str | None = Field(default=None, max_length=64)
    detail: str | None = Field(default=None, sa_type=sa.Text)
    created_at: dt.datetime = _when()
    updated_at: dt.datetime = _when()
    finished_at: dt.datetime | None = _when(nullable=True)


class TelemetryRollup(SQLModel, table=True):
    """Per device, per model version, per time window: sums the agents reported (latency as bucket counts)."""

    __tablename__ = "telemetry_rollups"
    __table_args__ = (
        sa.UniqueConstraint("device_id", "window_start", "model_version", name="uq_rollup_device_window_version"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="devices.id", index=True, max_length=128)
    class_name: str = Field(max_length=64)
    model_version: int = Field(default=0)
    window_start: dt.datetime = Field(sa_type=UTCDateTime, index=True)
    window_seconds: int
    messages: int = Field(default=0)
    inferences: int = Field(default=0, sa_type=sa.BigInteger)
    errors: int = Field(default=0, sa_type=sa.BigInteger)
    labelled: int = Field(default=0, sa_type=sa.BigInteger)
    correct: int = Field(default=0, sa_type=sa.BigInteger)
    confidence_sum: float = Field(default=0.0)
    latency_sum_s: float = Field(default=0.0)
    latency_counts_json: str = Field(default="[]", sa_type=sa.Text)


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = _when()
    actor: str = Field(max_length=128)
    action: str = Field(max_length=64, index=True)
    target: str = Field(max_length=256)
    detail_json: str = Field(default="{}", sa_type=sa.Text)


class Rollout(SQLModel, table=True):
    """One artifact rolled out to a class in waves, gated on the health of the devices that already have it.

    `state` is pending, running, paused, aborted or completed; the plan, the gate thresholds and the last gate
    results are JSON documents (see `edgefleet.controller.rollout.plan`).
    """

    __tablename__ = "rollouts"

    id: int | None = Field(default=None, primary_key=True)
    artifact_id: int = Field(foreign_key="artifacts.id", index=True)
    class_name: str = Field(foreign_key="device_classes.name", index=True, max_length=64)
    state: str = Field(max_length=16, index=True)
    on_breach: str = Field(max_length=16)
    plan_json: str = Field(default="{}", sa_type=sa.Text)
    gates_json: str = Field(default="{}", sa_type=sa.Text)
    selector_json: str = Field(default="{}", sa_type=sa.Text)
    wave_count: int = Field(default=1)
    current_wave: int = Field(default=-1)
    wave_started_at: dt.datetime | None = _when(nullable=True)
    # Gates judge telemetry from this time on (set on resume, so a resumed rollout is judged on fresh evidence).
    judge_since: dt.datetime | None = _when(nullable=True)
    previous_version: int | None = Field(default=None)
    gate_results_json: str = Field(default="{}", sa_type=sa.Text)
    breach_json: str | None = Field(default=None, sa_type=sa.Text)
    actor: str = Field(default="operator", max_length=128)
    created_at: dt.datetime = _when()
    updated_at: dt.datetime = _when()
    finished_at: dt.datetime | None = _when(nullable=True)


class RolloutDevice(SQLModel, table=True):
    """One device's place in a rollout: its wave, its deploy job and, after an abort, its rollback job."""

    __tablename__ = "rollout_devices"
    __table_args__ = (sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_device"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollouts.id", index=True)
    device_id: str = Field(foreign_key="devices.id", index=True, max_length=128)
    wave: int
    state: str = Field(max_length=32, index=True)
    job_id: str | None = Field(default=None, max_length=64)
    rollback_job_id: str | None = Field(default=None, max_length=64)
    previous_version: int | None = Field(default=None)
    attempts: int = Field(default=0)
    sent_at: dt.datetime | None = _when(nullable=True)
    finished_at: dt.datetime | None = _when(nullable=True)
    detail: str | None = Field(default=None, sa_type=sa.Text)


class ClassPolicy(SQLModel, table=True):
    """A class's recompression policy (the `[policy]` table of its TOML), as JSON."""

    __tablename__ = "class_policies"

    class_name: str = Field(primary_key=True, foreign_key="device_classes.name", max_length=64)
    policy_json: str = Field(default="{}", sa_type=sa.Text)
    updated_at: dt.datetime = _when()


class Recompression(SQLModel, table=True):
    """One recompression of a class: why (trigger and evidence), the artifact built, the decision, the rollout.

    `state` is building, pending (awaiting approval), rolling_out, done, rejected or failed.
    """

    __tablename__ = "recompressions"

    id: int | None = Field(default=None, primary_key=True)
    class_name: str = Field(foreign_key="device_classes.name", index=True, max_length=64)
    model_name: str = Field(max_length=128)
    from_artifact_id: int = Field(foreign_key="artifacts.id")
    trigger: str = Field(max_length=32)
    summary: str = Field(default="", sa_type=sa.Text)
    evidence_json: str = Field(default="{}", sa_type=sa.Text)
    state: str = Field(max_length=16, index=True)
    mode: str = Field(max_length=16)
    artifact_id: int | None = Field(default=None, foreign_key="artifacts.id")
    rollout_id: int | None = Field(default=None, foreign_key="rollouts.id")
    report_json: str = Field(default="{}", sa_type=sa.Text)
    decided_by: str | None = Field(default=None, max_length=128)
    note: str | None = Field(default=None, sa_type=sa.Text)
    created_at: dt.datetime = _when()
    updated_at: dt.datetime = _when()
    finished_at: dt.datetime | None = _when(nullable=True)
