"""Hostile input: whatever bytes arrive, a parser returns a valid model or raises one ProtocolError subclass."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.protocols import (
    MAX_PAYLOAD_BYTES,
    Bitmap,
    BlockRequest,
    ConfigureCommand,
    MessageKind,
    OversizeError,
    ProtocolError,
    SchemaError,
    UnsupportedSchemaError,
    decode,
    encode,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _valid_payloads(samples: Any) -> dict[MessageKind, bytes]:
    have = Bitmap(5)
    have.set(1)
    return {
        MessageKind.BIRTH: encode(samples.birth()),
        MessageKind.STATUS: encode(samples.status()),
        MessageKind.TELEMETRY: encode(samples.telemetry()),
        MessageKind.EVENTS: encode(samples.event()),
        MessageKind.BLOCK_REQUEST: encode(BlockRequest.for_missing("ab" * 32, have)),
        MessageKind.COMMAND: encode(samples.deploy()),
        MessageKind.MANIFEST: encode(samples.manifest()),
        MessageKind.SIGNED_MANIFEST: encode(samples.signed()),
    }


def _outcome(kind: MessageKind, payload: bytes) -> object:
    """Decode; a model must survive a round trip, and only ProtocolError may escape."""
    try:
        message = decode(kind, payload)
    except ProtocolError as exc:
        error = exc
    else:
        assert decode(kind, encode(message)) == message
        return message
    assert 0 < len(str(error)) < 2000, "error messages are there and stay short even for hostile input"
    return error


KINDS = st.sampled_from(list(MessageKind))


@FUZZ
@given(kind=KINDS, payload=st.binary(max_size=400))
def test_random_bytes(kind: MessageKind, payload: bytes) -> None:
    _outcome(kind, payload)


@FUZZ
@given(kind=KINDS, document=JSON_VALUES)
def test_random_json_documents(kind: MessageKind, document: object) -> None:
    _outcome(kind, json.dumps(document).encode())


@FUZZ
@given(kind=KINDS, cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_json(samples: Any, kind: MessageKind, cut: float) -> None:
    payload = _valid_payloads(samples)[kind]
    result = _outcome(kind, payload[: int(len(payload) * cut)])
    assert isinstance(result, ProtocolError)


def _paths(value: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    paths: list[tuple[str | int, ...]] = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            paths.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            paths.extend(_paths(child, (*prefix, index)))
    return paths


def _replace(document: Any, path: tuple[str | int, ...], value: object) -> None:
    for part in path[:-1]:
        document = document[part]
    document[path[-1]] = value


@FUZZ
@given(kind=KINDS, data=st.data(), value=JSON_VALUES)
def test_wrong_types_anywhere(samples: Any, kind: MessageKind, data: st.DataObject, value: object) -> None:
    document = json.loads(_valid_payloads(samples)[kind])
    path = data.draw(st.sampled_from(_paths(document)))
    _replace(document, path, value)
    _outcome(kind, json.dumps(document).encode())


@FUZZ
@given(kind=KINDS, data=st.data(), size=st.integers(4097, 20_000), char=st.sampled_from('a\u00e9\U0001f600 \\"'))
def test_oversized_fields(samples: Any, kind: MessageKind, data: st.DataObject, size: int, char: str) -> None:
    document = json.loads(_valid_payloads(samples)[kind])
    path = data.draw(st.sampled_from(_paths(document)))
    _replace(document, path, char * size)  # longer than any string field allows
    result = _outcome(kind, json.dumps(document).encode())
    assert isinstance(result, ProtocolError)


@FUZZ
@given(kind=KINDS, version=JSON_VALUES.filter(lambda v: v != 1))
def test_unknown_schema_versions(samples: Any, kind: MessageKind, version: object) -> None:
    document = json.loads(_valid_payloads(samples)[kind])
    document["schema"] = version
    with pytest.raises(UnsupportedSchemaError, match="schema"):
        decode(kind, json.dumps(document).encode())


@FUZZ
@given(kind=KINDS, key=st.text(min_size=1, max_size=20), value=JSON_VALUES)
def test_unknown_fields_are_refused(samples: Any, kind: MessageKind, key: str, value: object) -> None:
    document = json.loads(_valid_payloads(samples)[kind])
    if key in document:
        return
    document[key] = value
    with pytest.raises(SchemaError):
        decode(kind, json.dumps(document).encode())


@pytest.mark.parametrize("kind", list(MessageKind))
def test_payloads_over_the_limit_are_refused_before_parsing(kind: MessageKind) -> None:
    with pytest.raises(OversizeError, match=str(MAX_PAYLOAD_BYTES[kind])):
        decode(kind, b"{" * (MAX_PAYLOAD_BYTES[kind] + 1))


@FUZZ
@given(
    window=st.floats(allow_nan=False, allow_infinity=True) | st.none(),
    threads=st.integers() | st.none(),
    minutes=st.integers(-10, 10),
)
def test_command_values_are_bounded(samples: Any, window: float | None, threads: int | None, minutes: int) -> None:
    now = samples.now
    document = {
        "schema": 1,
        "type": "configure",
        "job_id": "cfg-1",
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(minutes=minutes)).isoformat(),
        "telemetry_window_s": window,
        "threads": threads,
    }
    result = _outcome(MessageKind.COMMAND, json.dumps(document).encode())
    if isinstance(result, ConfigureCommand):
        assert result.expires_at > result.issued_at
        assert result.threads is None or 1 <= result.threads <= 256
    else:
        assert isinstance(result, ProtocolError)
