"""The edgefleet home directory: registry database, signing key, artifact store, broker files.

Example::

    summary = init_home(settings)     # `edgefleet init`: idempotent
    db = open_database(settings)      # every other verb
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgefleet.controller.artifacts.keys import create_signing_key, public_key_path, public_raw
from edgefleet.controller.config import Settings
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.errors import ConfigError, RegistryError
from edgefleet.protocols.signing import key_id

__all__ = ["HomeSummary", "init_home", "open_database"]


def open_database(settings: Settings, *, create: bool = False) -> Database:
    """Open (and migrate) the registry; a missing SQLite file means `edgefleet init` was not run."""
    if settings.database_url is None and not create and not (settings.home / "registry.db").exists():
        raise RegistryError(f"no registry in {settings.home}: run `edgefleet init` first (or pass --home)")
    db = Database.open(settings.db_url, timeout=settings.db_timeout)
    db.migrate()
    return db


@dataclasses.dataclass(frozen=True, slots=True)
class HomeSummary:
    home: Path
    database: str
    key_path: Path
    public_key_path: Path
    key_id: str
    fleet: str


def init_home(settings: Settings, *, actor: str = "operator") -> HomeSummary:
    """Create the home, migrate the database, create the signing key and the configured fleet."""
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        settings.store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the edgefleet home {settings.home} ({exc.strerror or exc})") from exc
    db = open_database(settings, create=True)
    try:
        key = create_signing_key(settings.key_path)
        Registry(db, actor=actor).ensure_fleet(settings.fleet)
    finally:
        db.dispose()
    return HomeSummary(
        home=settings.home,
        database=db.url,
        key_path=settings.key_path,
        public_key_path=public_key_path(settings.key_path),
        key_id=key_id(public_raw(key)),
        fleet=settings.fleet,
    )
