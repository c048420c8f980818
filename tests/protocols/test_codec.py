"""Message round trips, golden fixtures that must keep parsing, and the error each kind of bad payload gets."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgefleet.protocols import (
    LATENCY_BUCKETS_SECONDS,
    MAX_PAYLOAD_BYTES,
    Birth,
    BlockRequest,
    ConfigureCommand,
    DecodeError,
    DeployCommand,
    JobEvent,
    MessageKind,
    OversizeError,
    ProtocolError,
    ResultCode,
    RollbackCommand,
    SchemaError,
    SignedManifest,
    Status,
    TelemetryBatch,
    UnsupportedSchemaError,
    bucket_index,
    check_fresh,
    decode,
    decode_command,
    encode,
    events_topic,
    expiry_seconds,
    kind_of,
    parse_topic,
    telemetry_topic,
    verify_manifest,
)
from edgefleet.protocols.errors import ExpiredError

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_KINDS = {
    "birth.json": Birth,
    "birth-first-connect.json": Birth,
    "status-online.json": Status,
    "status-offline.json": Status,
    "telemetry.json": TelemetryBatch,
    "job-event.json": JobEvent,
    "job-event-failed.json": JobEvent,
    "deploy-command.json": MessageKind.COMMAND,
    "rollback-command.json": MessageKind.COMMAND,
    "configure-command.json": MessageKind.COMMAND,
    "block-request.json": BlockRequest,
    "signed-manifest.json": SignedManifest,
}


@pytest.mark.parametrize("name", sorted(GOLDEN_KINDS))
def test_golden_fixtures_keep_parsing(name: str) -> None:
    payload = (GOLDEN / name).read_bytes()
    message = decode(GOLDEN_KINDS[name], payload)
    assert decode(GOLDEN_KINDS[name], encode(message)) == message
    assert json.loads(encode(message)) == json.loads(payload)


def test_every_golden_file_is_listed() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.json")) == sorted(GOLDEN_KINDS)


def test_golden_signed_manifest_still_verifies(samples: Any) -> None:
    """The canonical form must not drift: a manifest signed by an older build keeps verifying."""
    signed = decode(SignedManifest, (GOLDEN / "signed-manifest.json").read_bytes())
    trusted = {samples.key_id: samples.public_key}
    manifest = verify_manifest(signed, trusted_keys=trusted, now=NOW, current_version=2)
    assert manifest.version == 3


@pytest.mark.parametrize("factory", ["birth", "status", "telemetry", "event", "deploy", "signed", "manifest"])
def test_round_trip(samples: Any, factory: str) -> None:
    message = getattr(samples, factory)()
    data = encode(message)
    assert b'"schema":1' in data
    assert b"schema_version" not in data
    assert len(data) <= MAX_PAYLOAD_BYTES[kind_of(message)]
    assert decode(type(message), data) == message
    assert decode(kind_of(message), data) == message


def test_commands_decode_by_type(samples: Any) -> None:
    deploy = samples.deploy()
    assert isinstance(decode_command(encode(deploy)), DeployCommand)
    rollback = RollbackCommand(job_id="j", issued_at=NOW, expires_at=NOW + timedelta(minutes=5))
    assert decode_command(encode(rollback)) == rollback
    configure = ConfigureCommand(job_id="j", issued_at=NOW, expires_at=NOW + timedelta(minutes=5), threads=2)
    assert decode(MessageKind.COMMAND, encode(configure)) == configure
    with pytest.raises(SchemaError, match="expected a DeployCommand"):
        decode(DeployCommand, encode(rollback))


def test_expired_command_is_refused(samples: Any) -> None:
    command = samples.deploy()
    check_fresh(command, now=NOW)
    assert expiry_seconds(command, now=NOW) == 3600
    assert expiry_seconds(command, now=NOW + timedelta(minutes=59, seconds=59, milliseconds=500)) == 1
    with pytest.raises(ExpiredError):
        expiry_seconds(command, now=NOW + timedelta(hours=1))
    with pytest.raises(ExpiredError, match="expired") as info:
        check_fresh(command, now=NOW + timedelta(hours=2))
    assert info.value.result_code is ResultCode.EXPIRED


@pytest.mark.parametrize(
    ("payload", "error", "words"),
    [
        (b"\xff\xfe", DecodeError, "not UTF-8"),
        (b'{"schema":1,', DecodeError, "not valid JSON"),
        (b"[" * 1000, DecodeError, "not valid JSON"),
        (b'{"schema":2,"state":"online","timestamp":"2026-01-01T00:00:00Z"}', UnsupportedSchemaError, "schema"),
        (b'{"schema":1,"state":"sleeping","timestamp":"2026-01-01T00:00:00Z"}', SchemaError, "state"),
        (b'{"schema":1,"state":"online"}', SchemaError, "timestamp"),
        (b'{"schema":1,"state":"online","timestamp":"2026-01-01T00:00:00"}', SchemaError, "timestamp"),
        (b'{"schema":1,"state":"online","timestamp":"2026-01-01T00:00:00Z","x":1}', SchemaError, "x"),
        (b"[]", SchemaError, "object"),
        (b'{"schema":true,"state":"online","timestamp":"2026-01-01T00:00:00Z"}', UnsupportedSchemaError, "schema"),
        (b'{"schema":1.0,"state":"online","timestamp":"2026-01-01T00:00:00Z"}', UnsupportedSchemaError, "schema"),
        (b'{"schema":1,"state":"online","timestamp":1764417600}', SchemaError, "timestamp"),
        (b" " * 2000, OversizeError, "limit"),
    ],
)
def test_bad_status_payloads_get_one_clear_error(payload: bytes, error: type[ProtocolError], words: str) -> None:
    with pytest.raises(error, match=words):
        decode(Status, payload)


def test_non_bytes_and_unknown_kinds() -> None:
    with pytest.raises(DecodeError):
        decode(Status, "text")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode("nope", b"{}")


def test_oversized_telemetry_is_refused_before_parsing() -> None:
    payload = b'{"schema":1,"detail":"' + b"x" * MAX_PAYLOAD_BYTES[MessageKind.TELEMETRY] + b'"}'
    with pytest.raises(OversizeError, match="telemetry payload"):
        decode(TelemetryBatch, payload)


def test_oversized_fields_name_the_field(samples: Any) -> None:
    event = json.loads(encode(samples.event()))
    event["detail"] = "x" * 501
    with pytest.raises(SchemaError, match="detail"):
        decode(JobEvent, json.dumps(event).encode())


def test_failed_event_needs_a_code(samples: Any) -> None:
    event = json.loads(encode(samples.event()))
    event["state"] = "failed"
    with pytest.raises(SchemaError, match="non-zero result code"):
        decode(JobEvent, json.dumps(event).encode())
    event["result"] = int(ResultCode.OUT_OF_MEMORY)
    assert decode(JobEvent, json.dumps(event).encode()).result is ResultCode.OUT_OF_MEMORY


def test_telemetry_counts_must_add_up(samples: Any) -> None:
    batch = json.loads(encode(samples.telemetry()))
    batch["inference_count"] = 101
    with pytest.raises(SchemaError, match="add up"):
        decode(TelemetryBatch, json.dumps(batch).encode())
    batch["inference_count"], batch["latency_counts"] = 100, batch["latency_counts"][:-1]
    with pytest.raises(SchemaError, match="latency_counts"):
        decode(TelemetryBatch, json.dumps(batch).encode())
    batch = json.loads(encode(samples.telemetry()))
    batch["errors"] = {"cosmic_rays": 1}
    with pytest.raises(SchemaError, match="errors"):
        decode(TelemetryBatch, json.dumps(batch).encode())


def test_latency_buckets() -> None:
    assert len(LATENCY_BUCKETS_SECONDS) >= 20
    assert LATENCY_BUCKETS_SECONDS[0] == 0.0001
    assert LATENCY_BUCKETS_SECONDS[-1] == 10.0
    assert list(LATENCY_BUCKETS_SECONDS) == sorted(set(LATENCY_BUCKETS_SECONDS))
    assert bucket_index(0.00005) == 0
    assert bucket_index(0.0001) == 0  # upper bounds are inclusive, as in Prometheus
    assert bucket_index(0.00011) == 1
    assert bucket_index(11.0) == len(LATENCY_BUCKETS_SECONDS)


def test_times_are_normalised_to_utc() -> None:
    status = decode(Status, b'{"schema":1,"state":"online","timestamp":"2026-01-01T02:00:00+02:00"}')
    assert encode(status) == b'{"schema":1,"state":"online","timestamp":"2026-01-01T00:00:00Z"}'


def test_nan_is_refused(samples: Any) -> None:
    batch = json.loads(encode(samples.telemetry()))
    text = json.dumps(batch).replace('"latency_sum_seconds": 0.21', '"latency_sum_seconds": NaN')
    with pytest.raises(SchemaError, match="latency_sum_seconds"):
        decode(TelemetryBatch, text.encode())


def test_topic_kinds_name_their_message_kinds() -> None:
    parsed = parse_topic(telemetry_topic("plant-a", "cam-17"))
    assert MessageKind(parsed.kind) is MessageKind.TELEMETRY
    assert decode(MessageKind(parse_topic(events_topic("f", "d")).kind), encode(_event())).job_id == "job-42"


def _event() -> JobEvent:
    return JobEvent(job_id="job-42", state="idle", timestamp=NOW)


def test_wire_types_are_strict(samples: Any) -> None:
    batch = json.loads(encode(samples.telemetry()))
    batch["seq"] = "7"
    with pytest.raises(SchemaError, match="seq"):
        decode(TelemetryBatch, json.dumps(batch).encode())
    batch["seq"] = 7.0
    with pytest.raises(SchemaError, match="seq"):
        decode(TelemetryBatch, json.dumps(batch).encode())
