"""The controller's one error hierarchy: every failure an operator can meet is a `ControllerError`, clearly worded."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "ControllerError",
    "DatabaseUnavailableError",
    "KeyFileError",
    "NotFoundError",
    "RegistryError",
    "StoreError",
    "UnavailableError",
]


class ControllerError(RuntimeError):
    """Something the operator asked for cannot be done; the message names the thing and what to do."""


class ConfigError(ControllerError):
    """The configuration (flags, EDGEFLEET_* variables, TOML file) is invalid."""


class RegistryError(ControllerError):
    """A registry operation failed; nothing was written."""


class NotFoundError(RegistryError):
    """A fleet, class, device, model, artifact or job that does not exist was named."""


class ConflictError(RegistryError):
    """The thing already exists, or a concurrent writer got there first."""


class DatabaseUnavailableError(RegistryError):
    """The database is locked by another writer or cannot be reached."""


class StoreError(ControllerError):
    """The artifact store could not read or write a file."""


class KeyFileError(ControllerError):
    """The controller's signing key is missing or unreadable (run `edgefleet init`)."""


class UnavailableError(ControllerError):
    """A feature that needs a part of edgefleet which is not installed or not built yet."""
