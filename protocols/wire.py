"""The base of every wire message and the constrained field types they share (ids, digests, times, text)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from edgefleet.protocols.topics import ID_PATTERN

__all__ = [
    "MAX_BLOCKS",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "DeviceClass",
    "Digest",
    "Identifier",
    "Message",
    "SchemaVersion",
    "ShortText",
    "UtcDatetime",
    "VersionString",
    "WireModel",
]

# Artifacts travel in at most MAX_BLOCKS blocks of MIN_BLOCK_SIZE..MAX_BLOCK_SIZE bytes, which bounds both the
# manifest's block list (4096 hex digests, ~270 KiB) and the block-request bitmap (512 bytes).
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 128 * 1024
MAX_BLOCKS = 4096


def _to_utc(value: datetime) -> datetime:
    # One offset on the wire keeps the signed canonical form unique: 12:00+02:00 and 10:00Z are the same instant.
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc), Field(description="RFC 3339 time with offset")]
Identifier = Annotated[str, Field(pattern=f"^{ID_PATTERN}$", description="1-64 of A-Z a-z 0-9 _ . -")]
DeviceClass = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="device class (profile) name")]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256, 64 lower-case hex digits")]
VersionString = Annotated[str, Field(pattern=r"^\d{1,4}(\.\d{1,6}){1,3}([.+-][A-Za-z0-9.+-]{1,32})?$", max_length=48)]
ShortText = Annotated[str, Field(max_length=200)]
SchemaVersion = Literal[1]


class WireModel(BaseModel):
    """Frozen, strict about unknown fields, no NaN/Inf, strings bounded; the base of every part of a message."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        allow_inf_nan=False,
        str_max_length=4096,
    )


class Message(WireModel):
    """A top-level message: it carries a schema version, whose JSON key is `schema`.

    (A pydantic field named `schema` would shadow `BaseModel.schema`, hence the alias.)
    """

    schema_version: SchemaVersion = Field(1, alias="schema", description="message schema version")

    @field_validator("schema_version", mode="before")
    @classmethod
    def _an_integer(cls, value: object) -> object:
        # Literal[1] alone would take `true` and `1.0` as 1; a version is an integer.
        if isinstance(value, bool) or not isinstance(value, int):
            raise PydanticCustomError("literal_error", "Input should be the integer 1")
        return value
