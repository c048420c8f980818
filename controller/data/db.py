"""Database engine, migrations and transactions: the only module that opens SQL connections and sessions.

SQLite (WAL mode, a busy timeout) in the edgefleet home by default; PostgreSQL when a URL is given.
Every write runs in `Database.transaction()`: it commits as a whole or not at all, and turns the driver's
errors into `RegistryError`s that say what to do (a locked file, an unreachable server, a duplicate).

Example::

    db = Database.open("sqlite:////tmp/ef/registry.db")
    db.migrate()
    with db.transaction() as session:
        session.add(Fleet(name="default"))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlmodel import Session

from edgefleet.controller.errors import ConflictError, DatabaseUnavailableError, RegistryError

__all__ = ["Database"]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _describe(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


class Database:
    """An engine plus the rules for using it (transactions, error translation, migrations)."""

    def __init__(self, engine: sa.Engine, *, schema: str | None = None) -> None:
        self.engine = engine
        self.schema = schema
        self.url = _describe(engine.url)

    @classmethod
    def open(cls, url: str, *, timeout: float = 5.0, schema: str | None = None) -> Database:
        """Create the engine. `schema` (PostgreSQL only) puts every table in that schema via search_path."""
        try:
            parsed = make_url(url)
        except sa_exc.ArgumentError as exc:
            raise RegistryError(f"database URL {url!r} is not valid ({exc})") from exc
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": timeout, "check_same_thread": False}
        elif parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": max(1, int(timeout))}
            kwargs["pool_pre_ping"] = True
        try:
            engine = sa.create_engine(parsed, **kwargs)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as exc:
            raise RegistryError(f"cannot use database {_describe(parsed)}: {exc}") from exc
        if parsed.get_backend_name() == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        if schema is not None:
            sa.event.listen(engine, "connect", _search_path(schema))
        return cls(engine, schema=schema)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> None:
        """`alembic upgrade head` on this database (idempotent)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.guard("migrating the registry"), self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def guard(self, doing: str) -> Iterator[None]:
        """Translate driver errors raised inside into `RegistryError`s that name the database."""
        try:
            yield
        except sa_exc.IntegrityError as exc:
            raise ConflictError(f"{doing}: conflicts with what the registry holds ({_first_line(exc.orig)})") from exc
        except sa_exc.OperationalError as exc:
            text = str(exc.orig).lower()
            if "locked" in text or "busy" in text:
                raise DatabaseUnavailableError(
                    f"{doing}: the registry database {self.url} is locked by another writer; "
                    "nothing was written, try again (or raise EDGEFLEET_DB_TIMEOUT)"
                ) from exc
            raise DatabaseUnavailableError(
                f"{doing}: cannot use the registry database {self.url} ({_first_line(exc.orig)}); "
                "nothing was written, check that it is reachable"
            ) from exc
        except sa_exc.DBAPIError as exc:
            raise RegistryError(f"{doing}: database error on {self.url} ({_first_line(exc.orig)})") from exc
        except sa_exc.SQLAlchemyError as exc:
            raise RegistryError(f"{doing}: {exc}") from exc

    @contextmanager
    def transaction(self, doing: str = "writing to the registry") -> Iterator[Session]:
        """A session whose work commits at the end of the block, or rolls back entirely on any error."""
        with self.guard(doing), Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def reading(self, doing: str = "reading the registry") -> Iterator[Session]:
        """A session for queries; nothing it does is committed."""
        with self.guard(doing), Session(self.engine, expire_on_commit=False) as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _first_line(exc: BaseException | None) -> str:
    return str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else type(exc).__name__


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        mode = cursor.execute("PRAGMA journal_mode").fetchone()
        if mode and str(mode[0]).lower() not in {"wal", "memory"}:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _search_path(schema: str) -> Any:
    def set_path(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            cursor.execute(f'SET search_path TO "{schema}"')
        finally:
            cursor.close()
        dbapi_conn.commit()

    return set_path
