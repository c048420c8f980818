"""The one error hierarchy of the wire contract: every parser raises a `ProtocolError` subclass, nothing else."""

from __future__ import annotations

__all__ = ["ProfileError", "ProtocolError"]


class ProtocolError(ValueError):
    """Something that crossed (or would cross) the wire is not valid; the message says what and where."""


class ProfileError(ProtocolError):
    """A device profile file is missing, unreadable or has a missing or wrong field."""
