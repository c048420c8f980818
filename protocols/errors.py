"""The one error hierarchy of the wire contract: every parser raises a `ProtocolError` subclass, nothing else.

Each error carries a `result_code` (a `ResultCode`) so that a device can report any failure as a number in a
`JobEvent` without a lookup table of its own: `JobEvent(result=exc.result_code, detail=str(exc), ...)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from edgefleet.protocols.codes import ResultCode

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "BlockError",
    "DecodeError",
    "DigestMismatchError",
    "DowngradeError",
    "ExpiredError",
    "IncompatibleError",
    "OversizeError",
    "ProfileError",
    "ProtocolError",
    "SchemaError",
    "SignatureInvalidError",
    "TopicError",
    "UnknownKeyError",
    "UnsupportedSchemaError",
    "VerificationError",
    "describe_problems",
]


def describe_problems(exc: ValidationError, *, subject: str) -> str:
    """A pydantic error as one line an operator can act on: `field.sub: message; other: message`.

    `subject` names the whole document where an error has no field (e.g. "profile", "policy").
    """
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or subject}: {err['msg']}" for err in exc.errors())


class ProtocolError(ValueError):
    """Something that crossed (or would cross) the wire is not valid; the message says what and where."""

    result_code: ClassVar[ResultCode] = ResultCode.INVALID_MESSAGE


class ProfileError(ProtocolError):
    """A device profile file is missing, unreadable or has a missing or wrong field."""


class DecodeError(ProtocolError):
    """The payload is not UTF-8 JSON at all (binary junk, truncated, nested too deep)."""


class SchemaError(ProtocolError):
    """The payload is JSON but a field is missing, extra or wrong; the message names the field."""


class UnsupportedSchemaError(SchemaError):
    """The payload's `schema` version is one this side does not speak."""

    result_code: ClassVar[ResultCode] = ResultCode.UNSUPPORTED


class OversizeError(ProtocolError):
    """The payload is larger than its kind allows (checked before parsing)."""


class TopicError(ProtocolError):
    """A topic string or an id used to build one is not valid."""


class BlockError(ProtocolError):
    """A binary artifact block is corrupt: bad magic or version, truncated, wrong length or checksum."""

    result_code: ClassVar[ResultCode] = ResultCode.INTEGRITY_FAILURE


class VerificationError(ProtocolError):
    """A well-formed manifest or artifact must not be used; the subclass says why."""

    result_code: ClassVar[ResultCode] = ResultCode.INTEGRITY_FAILURE


class SignatureInvalidError(VerificationError):
    """The Ed25519 signature does not match the manifest (tampered, corrupted or signed by another key)."""

    result_code: ClassVar[ResultCode] = ResultCode.SIGNATURE_INVALID


class UnknownKeyError(VerificationError):
    """The manifest names a key id that is not among the trusted keys."""

    result_code: ClassVar[ResultCode] = ResultCode.UNKNOWN_KEY


class DigestMismatchError(VerificationError):
    """Artifact bytes (or one block) do not hash to what the manifest says."""

    result_code: ClassVar[ResultCode] = ResultCode.INTEGRITY_FAILURE


class DowngradeError(VerificationError):
    """The manifest's version is not above the running one and no explicit rollback allows it."""

    result_code: ClassVar[ResultCode] = ResultCode.DOWNGRADE_REFUSED


class ExpiredError(VerificationError):
    """The manifest or command is past its `expires_at`."""

    result_code: ClassVar[ResultCode] = ResultCode.EXPIRED


class IncompatibleError(VerificationError):
    """The artifact needs more than the device has (opset, onnxruntime version, device class)."""

    result_code: ClassVar[ResultCode] = ResultCode.UNSUPPORTED
