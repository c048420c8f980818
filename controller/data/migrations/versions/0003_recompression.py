"""Recompression: per-class policies and the record of each recompression (trigger, artifact, decision, rollout).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 21:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "class_policies",
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("policy_json", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["class_name"], ["device_classes.name"]),
        sa.PrimaryKeyConstraint("class_name"),
    )
    op.create_table(
        "recompressions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("from_artifact_id", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(length=32), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("evidence_json", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("artifact_id", sa.Integer(), nullable=True),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("report_json", sa.Text(), nullable=False),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["artifact_id"], ["artifacts.id"]),
        sa.ForeignKeyConstraint(["class_name"], ["device_classes.name"]),
        sa.ForeignKeyConstraint(["from_artifact_id"], ["artifacts.id"]),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_recompressions_class_name"), "recompressions", ["class_name"], unique=False)
    op.create_index(op.f("ix_recompressions_state"), "recompressions", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_recompressions_state"), table_name="recompressions")
    op.drop_index(op.f("ix_recompressions_class_name"), table_name="recompressions")
    op.drop_table("recompressions")
    op.drop_table("class_policies")
