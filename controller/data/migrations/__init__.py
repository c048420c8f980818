"""Alembic migrations of the registry."""
