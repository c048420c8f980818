"""Alembic environment, configured from code: `db.migrate()` passes an open connection, no alembic.ini needed."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from edgefleet.controller.data import tables  # noqa: F401 - registers the tables on SQLModel.metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through edgefleet.controller.data.db.migrate(), which passes a connection")

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
