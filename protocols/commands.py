"""Controller → device commands (deploy, rollback, configure), one discriminated union on `type`.

Every command carries `expires_at` in its payload, so a device on MQTT 3.1.1 (no message expiry) still drops
a command that waited too long in its persistent session. Check it with `check_fresh(command, now=...)`.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from edgefleet.protocols.errors import ExpiredError, ProtocolError
from edgefleet.protocols.manifest import SignedManifest
from edgefleet.protocols.wire import Identifier, Message, ShortText, UtcDatetime

__all__ = ["Command", "ConfigureCommand", "DeployCommand", "RollbackCommand", "check_fresh", "expiry_seconds"]


class _CommandBase(Message):
    job_id: Identifier
    issued_at: UtcDatetime
    expires_at: UtcDatetime

    @model_validator(mode="after")
    def _expires_after_issue(self) -> Self:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at: is not after issued_at")
        return self


class DeployCommand(_CommandBase):
    """Fetch, verify, install and validate the artifact the signed manifest describes."""

    type: Literal["deploy"] = "deploy"
    manifest: SignedManifest


class RollbackCommand(_CommandBase):
    """Go back to an earlier model. This is the only way a device accepts a lower version.

    Without `manifest` the device switches to its previous slot (which must hold `target_version` when that
    is given). With `manifest` (a signed manifest of the lower version) the device downloads it and installs
    it with `allow_rollback=True`.
    """

    type: Literal["rollback"] = "rollback"
    target_version: Annotated[int | None, Field(ge=1, le=2**31 - 1)] = None
    manifest: SignedManifest | None = None
    reason: ShortText = ""

    @model_validator(mode="after")
    def _target_matches_manifest(self) -> Self:
        if self.manifest is not None and self.target_version not in {None, self.manifest.manifest.version}:
            raise ValueError("target_version: differs from the manifest's version")
        return self


class ConfigureCommand(_CommandBase):
    """Change agent settings; a field left out (None) keeps its current value."""

    type: Literal["configure"] = "configure"
    telemetry_window_s: Annotated[float | None, Field(ge=1.0, le=86400.0)] = None
    threads: Annotated[int | None, Field(ge=1, le=256)] = None
    probation_s: Annotated[float | None, Field(ge=0.0, le=7 * 86400.0)] = None
    label_sample_rate: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    log_level: Literal["debug", "info", "warning", "error"] | None = None


Command = Annotated[DeployCommand | RollbackCommand | ConfigureCommand, Field(discriminator="type")]


def check_fresh(command: DeployCommand | RollbackCommand | ConfigureCommand, *, now: datetime) -> None:
    """Raise ExpiredError when `now` is at or past the command's `expires_at`."""
    if now.tzinfo is None:
        raise ProtocolError("check_fresh needs an aware `now` (e.g. datetime.now(UTC))")
    if now >= command.expires_at:
        raise ExpiredError(
            f"{command.type} command of job {command.job_id} expired at {command.expires_at.isoformat()}"
        )


def expiry_seconds(command: DeployCommand | RollbackCommand | ConfigureCommand, *, now: datetime) -> int:
    """Whole seconds until `expires_at` (at least 1), for the MQTT 5 PUBLISH message expiry interval.

    Raises ExpiredError when the command is already expired (do not publish it).
    """
    check_fresh(command, now=now)
    return max(1, math.ceil((command.expires_at - now).total_seconds()))
