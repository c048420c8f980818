"""The controller's one error hierarchy: every failure an operator can meet is a `ControllerError`, clearly worded."""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "ConflictError",
    "ControllerError",
    "DatabaseUnavailableError",
    "KeyFileError",
    "MqttError",
    "NotFoundError",
    "NothingFitsError",
    "RegistryError",
    "StoreError",
    "UnavailableError",
    "ValidationDataError",
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


class BrokerError(ControllerError):
    """The managed broker could not be started or did not answer."""


class MqttError(ControllerError):
    """The broker cannot be reached, refused us, or did not acknowledge a publish in time."""


class NothingFitsError(ControllerError):
    """The planner found no recipe that fits the class; nothing was stored."""


class ValidationDataError(ControllerError):
    """The validation data cannot be read, or does not fit the model; nothing was stored."""
