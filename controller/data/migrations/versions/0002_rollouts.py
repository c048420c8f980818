"""Rollouts: a rollout per artifact and class, and each device's place (wave, jobs) in it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("artifact_id", sa.Integer(), nullable=False),
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("on_breach", sa.String(length=16), nullable=False),
        sa.Column("plan_json", sa.Text(), nullable=False),
        sa.Column("gates_json", sa.Text(), nullable=False),
        sa.Column("selector_json", sa.Text(), nullable=False),
        sa.Column("wave_count", sa.Integer(), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("judge_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("previous_version", sa.Integer(), nullable=True),
        sa.Column("gate_results_json", sa.Text(), nullable=False),
        sa.Column("breach_json", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["artifact_id"], ["artifacts.id"]),
        sa.ForeignKeyConstraint(["class_name"], ["device_classes.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_rollouts_artifact_id"), "rollouts", ["artifact_id"], unique=False)
    op.create_index(op.f("ix_rollouts_class_name"), "rollouts", ["class_name"], unique=False)
    op.create_index(op.f("ix_rollouts_state"), "rollouts", ["state"], unique=False)
    op.create_table(
        "rollout_devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("rollback_job_id", sa.String(length=64), nullable=True),
        sa.Column("previous_version", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_device"),
    )
    op.create_index(op.f("ix_rollout_devices_device_id"), "rollout_devices", ["device_id"], unique=False)
    op.create_index(op.f("ix_rollout_devices_rollout_id"), "rollout_devices", ["rollout_id"], unique=False)
    op.create_index(op.f("ix_rollout_devices_state"), "rollout_devices", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_rollout_devices_state"), table_name="rollout_devices")
    op.drop_index(op.f("ix_rollout_devices_rollout_id"), table_name="rollout_devices")
    op.drop_index(op.f("ix_rollout_devices_device_id"), table_name="rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_index(op.f("ix_rollouts_state"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_class_name"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_artifact_id"), table_name="rollouts")
    op.drop_table("rollouts")
