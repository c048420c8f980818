"""Every MQTT topic of edgefleet is built and parsed here, and nowhere else.

Layout (root `edgefleet/v1/{fleet}`)::

    edgefleet/v1/{fleet}/device/{device}/birth        device → controller, QoS 1
    edgefleet/v1/{fleet}/device/{device}/status       device → controller, QoS 1, retained, last will "offline"
    edgefleet/v1/{fleet}/device/{device}/telemetry    device → controller, QoS 1
    edgefleet/v1/{fleet}/device/{device}/events       device → controller, QoS 1 (job events)
    edgefleet/v1/{fleet}/device/{device}/blocks/req   device → controller, QoS 1 (block requests)
    edgefleet/v1/{fleet}/device/{device}/cmd          controller → device, QoS 1 (commands)
    edgefleet/v1/{fleet}/artifact/{sha256}/blocks     controller → devices, QoS 0 (binary blocks, shared broadcast)

The device id is also the MQTT username and client id, so broker ACLs can key on `%u` (see `device_acl_patterns`).
Ids are checked when a topic is built, so `+`, `#`, `/` and empty ids can never reach the broker.

Example::

    >>> telemetry_topic("plant-a", "cam-17")
    'edgefleet/v1/plant-a/device/cam-17/telemetry'
    >>> parse_topic("edgefleet/v1/plant-a/device/cam-17/telemetry").kind
    <TopicKind.TELEMETRY: 'telemetry'>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from edgefleet.protocols.errors import TopicError

__all__ = [
    "ID_PATTERN",
    "ROOT",
    "TOPIC_SPECS",
    "ParsedTopic",
    "TopicKind",
    "TopicSpec",
    "artifact_blocks_filter",
    "artifact_blocks_topic",
    "birth_topic",
    "block_request_topic",
    "check_id",
    "command_topic",
    "controller_acl_patterns",
    "controller_filters",
    "device_acl_patterns",
    "device_filters",
    "device_topic",
    "events_topic",
    "parse_topic",
    "status_topic",
    "telemetry_topic",
]

ROOT = "edgefleet/v1"
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_ID = re.compile(ID_PATTERN)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_TOPIC_LENGTH = 256


class TopicKind(StrEnum):
    """What a topic carries; the value is also the message kind used by `decode`."""

    BIRTH = "birth"
    STATUS = "status"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    BLOCK_REQUEST = "block_request"
    COMMAND = "command"
    ARTIFACT_BLOCKS = "artifact_blocks"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How one kind of topic is used: its suffix, who publishes, QoS and retain flag."""

    suffix: str
    direction: str
    qos: int
    retain: bool


TOPIC_SPECS: dict[TopicKind, TopicSpec] = {
    TopicKind.BIRTH: TopicSpec("birth", "device → controller", 1, retain=False),
    TopicKind.STATUS: TopicSpec("status", "device → controller", 1, retain=True),
    TopicKind.TELEMETRY: TopicSpec("telemetry", "device → controller", 1, retain=False),
    TopicKind.EVENTS: TopicSpec("events", "device → controller", 1, retain=False),
    TopicKind.BLOCK_REQUEST: TopicSpec("blocks/req", "device → controller", 1, retain=False),
    TopicKind.COMMAND: TopicSpec("cmd", "controller → device", 1, retain=False),
    TopicKind.ARTIFACT_BLOCKS: TopicSpec("blocks", "controller → devices", 0, retain=False),
}
_DEVICE_KINDS = tuple(kind for kind in TopicKind if kind is not TopicKind.ARTIFACT_BLOCKS)
_UPLINK_KINDS = tuple(kind for kind in _DEVICE_KINDS if kind is not TopicKind.COMMAND)
_BY_SUFFIX = {TOPIC_SPECS[kind].suffix: kind for kind in _DEVICE_KINDS}


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic taken apart: `device` is set for per-device topics, `digest` for artifact topics."""

    kind: TopicKind
    fleet: str
    device: str | None = None
    digest: str | None = None


def check_id(value: str, *, what: str = "id") -> str:
    """Return `value` if it is a valid fleet/device id (`[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`), else raise TopicError."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise TopicError(
            f"{what} {value!r:.80} is not valid: use 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return value


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise TopicError(f"artifact digest {digest!r:.80} is not valid: use 64 lower-case hex digits (sha256)")
    return digest


def device_topic(kind: TopicKind, fleet: str, device: str) -> str:
    """The per-device topic of `kind` (any kind but ARTIFACT_BLOCKS)."""
    if kind is TopicKind.ARTIFACT_BLOCKS:
        raise TopicError("artifact block topics are per artifact, not per device: use artifact_blocks_topic")
    check_id(fleet, what="fleet")
    check_id(device, what="device")
    return f"{ROOT}/{fleet}/device/{device}/{TOPIC_SPECS[kind].suffix}"


def birth_topic(fleet: str, device: str) -> str:
    """Where a device announces itself and its capabilities on every connect."""
    return device_topic(TopicKind.BIRTH, fleet, device)


def status_topic(fleet: str, device: str) -> str:
    """Retained online/offline status; the offline payload is the device's last will."""
    return device_topic(TopicKind.STATUS, fleet, device)


def telemetry_topic(fleet: str, device: str) -> str:
    """Telemetry batches from one device."""
    return device_topic(TopicKind.TELEMETRY, fleet, device)


def events_topic(fleet: str, device: str) -> str:
    """Job progress events from one device."""
    return device_topic(TopicKind.EVENTS, fleet, device)


def block_request_topic(fleet: str, device: str) -> str:
    """Block requests (bitmaps of wanted blocks) from one device."""
    return device_topic(TopicKind.BLOCK_REQUEST, fleet, device)


def command_topic(fleet: str, device: str) -> str:
    """Commands (deploy, rollback, configure) to one device."""
    return device_topic(TopicKind.COMMAND, fleet, device)


def artifact_blocks_topic(fleet: str, digest: str) -> str:
    """The broadcast topic of one artifact's blocks, shared by every device downloading it."""
    check_id(fleet, what="fleet")
    return f"{ROOT}/{fleet}/artifact/{_check_digest(digest)}/blocks"


def artifact_blocks_filter(fleet: str) -> str:
    """A filter matching the block broadcasts of every artifact in a fleet."""
    check_id(fleet, what="fleet")
    return f"{ROOT}/{fleet}/artifact/+/blocks"


def parse_topic(topic: str) -> ParsedTopic:
    """Take a topic apart; raises TopicError for anything that `*_topic` could not have built."""
    if not isinstance(topic, str) or len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(f"topic {topic!r:.80} is not a string of at most {MAX_TOPIC_LENGTH} characters")
    parts = topic.split("/")
    if len(parts) < 6 or f"{parts[0]}/{parts[1]}" != ROOT:
        raise TopicError(f"topic {topic!r:.120} is not under {ROOT}/{{fleet}}/device|artifact/...")
    fleet = check_id(parts[2], what="fleet")
    if parts[3] == "device":
        device = check_id(parts[4], what="device")
        kind = _BY_SUFFIX.get("/".join(parts[5:]))
        if kind is None:
            raise TopicError(f"topic {topic!r:.120}: unknown device topic suffix {'/'.join(parts[5:])!r:.40}")
        return ParsedTopic(kind, fleet, device=device)
    if parts[3] == "artifact" and len(parts) == 6 and parts[5] == "blocks":
        return ParsedTopic(TopicKind.ARTIFACT_BLOCKS, fleet, digest=_check_digest(parts[4]))
    raise TopicError(f"topic {topic!r:.120} is not a known edgefleet topic")


def _fleet_or_wildcard(fleet: str) -> str:
    return fleet if fleet == "+" else check_id(fleet, what="fleet")


def controller_filters(fleet: str = "+", *, shared_group: str | None = None) -> tuple[str, ...]:
    """Subscription filters for a controller: every device → controller topic of one fleet (or all, `+`).

    With `shared_group`, each filter becomes `$share/{group}/...` (MQTT 5 shared subscriptions), so several
    controller replicas split the load. Brokers do not send retained messages to shared subscriptions: a
    replica that needs the retained status of every device subscribes to `status` without the group as well.
    """
    fleet = _fleet_or_wildcard(fleet)
    filters = tuple(f"{ROOT}/{fleet}/device/+/{TOPIC_SPECS[kind].suffix}" for kind in _UPLINK_KINDS)
    if shared_group is None:
        return filters
    if _GROUP.fullmatch(shared_group) is None:
        raise TopicError(f"shared group {shared_group!r:.80} is not valid: use 1-64 of A-Z a-z 0-9 _ -")
    return tuple(f"$share/{shared_group}/{topic}" for topic in filters)


def device_filters(fleet: str, device: str) -> tuple[str, ...]:
    """What a device subscribes to at connect: its command topic.

    Block broadcasts are subscribed per download with `artifact_blocks_topic(fleet, digest)` and dropped after.
    """
    return (command_topic(fleet, device),)


def device_acl_patterns(fleet: str = "+") -> tuple[str, ...]:
    """Mosquitto ACL `pattern` lines for the device role, keyed on `%u` (username = device id).

    A device may publish only its own uplink topics and read only its own commands and the block broadcasts.
    """
    fleet = _fleet_or_wildcard(fleet)
    lines = [f"pattern write {ROOT}/{fleet}/device/%u/{TOPIC_SPECS[kind].suffix}" for kind in _UPLINK_KINDS]
    lines.append(f"pattern read {ROOT}/{fleet}/device/%u/{TOPIC_SPECS[TopicKind.COMMAND].suffix}")
    lines.append(f"pattern read {ROOT}/{fleet}/artifact/+/blocks")
    return tuple(lines)


def controller_acl_patterns() -> tuple[str, ...]:
    """Mosquitto ACL `topic` lines for a controller user (put them under its `user` line)."""
    return (f"topic readwrite {ROOT}/#",)
