"""The one way bytes become messages and back: `decode(kind, payload)` and `encode(message)`.

Any byte string given to `decode` either yields a valid model or raises one `ProtocolError` subclass:
OversizeError (checked before parsing), DecodeError (not UTF-8 JSON), UnsupportedSchemaError (a `schema`
version this side does not speak) or SchemaError (the message names the field). Nothing else escapes.

Example::

    birth = decode(Birth, payload)                  # typed by the class
    command = decode(MessageKind.COMMAND, payload)  # DeployCommand | RollbackCommand | ConfigureCommand
    client.publish(topic, encode(birth), qos=1)
"""

from __future__ import annotations

from enum import StrEnum
from typing import NoReturn, TypeVar, overload

from pydantic import BaseModel, TypeAdapter, ValidationError

from edgefleet.protocols.blocks import BlockRequest
from edgefleet.protocols.commands import Command, ConfigureCommand, DeployCommand, RollbackCommand
from edgefleet.protocols.errors import DecodeError, OversizeError, ProtocolError, SchemaError, UnsupportedSchemaError
from edgefleet.protocols.manifest import Manifest, SignedManifest
from edgefleet.protocols.messages import Birth, JobEvent, Status
from edgefleet.protocols.telemetry import TelemetryBatch
from edgefleet.protocols.topics import TopicKind
from edgefleet.protocols.wire import Message

__all__ = ["MAX_PAYLOAD_BYTES", "AnyCommand", "MessageKind", "decode", "decode_command", "encode", "kind_of"]

M = TypeVar("M", bound=Message)
AnyCommand = DeployCommand | RollbackCommand | ConfigureCommand


class MessageKind(StrEnum):
    """Every JSON message kind; the per-device topic kinds share their names (`MessageKind(topic.kind)`)."""

    BIRTH = TopicKind.BIRTH.value
    STATUS = TopicKind.STATUS.value
    TELEMETRY = TopicKind.TELEMETRY.value
    EVENTS = TopicKind.EVENTS.value
    BLOCK_REQUEST = TopicKind.BLOCK_REQUEST.value
    COMMAND = TopicKind.COMMAND.value
    MANIFEST = "manifest"
    SIGNED_MANIFEST = "signed_manifest"


_KiB = 1024
# Checked before parsing. Anything carrying a manifest may hold 4096 block digests plus validation samples.
MAX_PAYLOAD_BYTES: dict[MessageKind, int] = {
    MessageKind.BIRTH: 8 * _KiB,
    MessageKind.STATUS: 1 * _KiB,
    MessageKind.TELEMETRY: 8 * _KiB,
    MessageKind.EVENTS: 4 * _KiB,
    MessageKind.BLOCK_REQUEST: 2 * _KiB,
    MessageKind.COMMAND: 1024 * _KiB,
    MessageKind.MANIFEST: 1024 * _KiB,
    MessageKind.SIGNED_MANIFEST: 1024 * _KiB,
}
_MODELS: dict[MessageKind, type[Message]] = {
    MessageKind.BIRTH: Birth,
    MessageKind.STATUS: Status,
    MessageKind.TELEMETRY: TelemetryBatch,
    MessageKind.EVENTS: JobEvent,
    MessageKind.BLOCK_REQUEST: BlockRequest,
    MessageKind.MANIFEST: Manifest,
    MessageKind.SIGNED_MANIFEST: SignedManifest,
}
_KIND_OF: dict[type[Message], MessageKind] = {model: kind for kind, model in _MODELS.items()}
_KIND_OF.update({DeployCommand: MessageKind.COMMAND, RollbackCommand: MessageKind.COMMAND})
_KIND_OF[ConfigureCommand] = MessageKind.COMMAND
_COMMAND_ADAPTER: TypeAdapter[AnyCommand] = TypeAdapter(Command)
_MAX_ERRORS_SHOWN = 3
# Errors on a `schema` key that mean "another version" (not 1, or an integer too large to read).
_SCHEMA_ERRORS = frozenset({"literal_error", "int_parsing_size"})
_MAX_MSG = 200  # pydantic messages may quote the input (an unknown tag); a hostile one must not flood logs


def kind_of(model: type[Message] | Message) -> MessageKind:
    """The message kind of a model class or instance (all commands are `COMMAND`)."""
    cls = model if isinstance(model, type) else type(model)
    try:
        return _KIND_OF[cls]
    except KeyError:
        raise ProtocolError(f"{cls.__name__} is not a wire message") from None


def _text(kind: MessageKind, payload: object) -> str:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise DecodeError(f"{kind} payload must be bytes, not {type(payload).__name__}")
    limit = MAX_PAYLOAD_BYTES[kind]
    if len(payload) > limit:
        raise OversizeError(f"{kind} payload of {len(payload)} bytes is over the {limit}-byte limit")
    try:
        return bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{kind} payload is not UTF-8 (byte {exc.start}): send UTF-8 JSON") from exc


def _describe(loc: tuple[int | str, ...], error_type: str, message: str) -> str:
    if error_type.startswith("union_tag"):  # the command's `type` is missing or unknown
        loc = (*loc, "type")
    # Our model validators start their message with the field they blame ("wanted: ...").
    message = message.removeprefix("Value error, ")[:_MAX_MSG]
    where = ".".join(str(part) for part in loc)
    return f"{where}: {message}" if where else message


def _raise_for(kind: MessageKind, exc: ValidationError) -> NoReturn:
    errors = exc.errors(include_url=False, include_input=False)
    for err in errors:
        if err["type"] == "json_invalid":
            raise DecodeError(
                f"{kind} payload is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
            ) from exc
    for err in errors:
        if err["type"] in _SCHEMA_ERRORS and err["loc"] and err["loc"][-1] == "schema":
            where = ".".join(str(part) for part in err["loc"])
            raise UnsupportedSchemaError(f"{kind}: {where}: unsupported schema version (this side speaks 1)") from exc
    shown = "; ".join(_describe(err["loc"], err["type"], err["msg"]) for err in errors[:_MAX_ERRORS_SHOWN])
    more = f" (and {len(errors) - _MAX_ERRORS_SHOWN} more)" if len(errors) > _MAX_ERRORS_SHOWN else ""
    raise SchemaError(f"{kind}: {shown}{more}") from exc


@overload
def decode(kind: type[M], payload: bytes) -> M: ...
@overload
def decode(kind: MessageKind | str, payload: bytes) -> Message: ...
def decode(kind: type[Message] | MessageKind | str, payload: bytes) -> Message:
    """Parse `payload` as the message `kind` (a model class or a MessageKind); see the module docstring."""
    if isinstance(kind, type):
        message_kind = kind_of(kind)
        model: type[Message] | None = kind if message_kind is not MessageKind.COMMAND else None
    else:
        try:
            message_kind = MessageKind(kind)
        except ValueError:
            raise ProtocolError(f"unknown message kind {kind!r:.40}") from None
        model = _MODELS.get(message_kind)
    text = _text(message_kind, payload)
    try:
        result: Message = (
            _COMMAND_ADAPTER.validate_json(text, strict=True)
            if model is None
            else model.model_validate_json(text, strict=True)
        )
    except ValidationError as exc:
        _raise_for(message_kind, exc)
    except (ValueError, TypeError, RecursionError) as exc:  # defensive: a validator bug must not escape as-is
        raise SchemaError(f"{message_kind}: {exc}") from exc
    if isinstance(kind, type) and not isinstance(result, kind):
        raise SchemaError(f"{message_kind}: expected a {kind.__name__}, got a {type(result).__name__}")
    return result


def decode_command(payload: bytes) -> AnyCommand:
    """Parse a command payload into DeployCommand, RollbackCommand or ConfigureCommand (by its `type`)."""
    result = decode(MessageKind.COMMAND, payload)
    if not isinstance(result, DeployCommand | RollbackCommand | ConfigureCommand):  # pragma: no cover - the union
        raise SchemaError(f"command: not a command but a {type(result).__name__}")
    return result


def encode(message: BaseModel) -> bytes:
    """Compact UTF-8 JSON with JSON keys (`schema`); raises OversizeError if the peer would refuse it."""
    if not isinstance(message, Message):
        raise ProtocolError(f"{type(message).__name__} is not a wire message")
    kind = kind_of(message)
    data = message.model_dump_json(by_alias=True).encode("utf-8")
    if len(data) > MAX_PAYLOAD_BYTES[kind]:
        raise OversizeError(f"{kind} message of {len(data)} bytes is over the {MAX_PAYLOAD_BYTES[kind]}-byte limit")
    return data
