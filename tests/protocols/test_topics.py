"""Topic builders, the parser, subscription filters and ACL lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.protocols import (
    ParsedTopic,
    TopicError,
    TopicKind,
    artifact_blocks_topic,
    birth_topic,
    block_request_topic,
    command_topic,
    controller_filters,
    device_acl_patterns,
    device_filters,
    events_topic,
    parse_topic,
    status_topic,
    telemetry_topic,
)
from edgefleet.protocols.topics import TOPIC_SPECS, device_topic

DIGEST = "0f" * 32
IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z", fullmatch=True)


def test_topics_have_the_documented_layout() -> None:
    assert birth_topic("plant-a", "cam-17") == "edgefleet/v1/plant-a/device/cam-17/birth"
    assert status_topic("plant-a", "cam-17") == "edgefleet/v1/plant-a/device/cam-17/status"
    assert telemetry_topic("plant-a", "cam-17") == "edgefleet/v1/plant-a/device/cam-17/telemetry"
    assert events_topic("plant-a", "cam-17") == "edgefleet/v1/plant-a/device/cam-17/events"
    assert block_request_topic("plant-a", "cam-17") == "edgefleet/v1/plant-a/device/cam-17/blocks/req"
    assert command_topic("plant-a", "cam-17") == "edgefleet/v1/plant-a/device/cam-17/cmd"
    assert artifact_blocks_topic("plant-a", DIGEST) == f"edgefleet/v1/plant-a/artifact/{DIGEST}/blocks"


@settings(max_examples=60, deadline=None)
@given(fleet=IDS, device=IDS, kind=st.sampled_from([k for k in TopicKind if k is not TopicKind.ARTIFACT_BLOCKS]))
def test_device_topics_round_trip(fleet: str, device: str, kind: TopicKind) -> None:
    assert parse_topic(device_topic(kind, fleet, device)) == ParsedTopic(kind, fleet, device=device)


def test_artifact_topic_round_trips() -> None:
    parsed = parse_topic(artifact_blocks_topic("f1", DIGEST))
    assert parsed == ParsedTopic(TopicKind.ARTIFACT_BLOCKS, "f1", digest=DIGEST)


@pytest.mark.parametrize(
    "bad", ["", "+", "#", "a/b", "cam+1", "cam#", "-lead", ".hidden", "x" * 65, "caf\u00e9", "a b", "a\x00b", "$SYS"]
)
def test_hostile_ids_are_refused(bad: str) -> None:
    with pytest.raises(TopicError, match="not valid"):
        telemetry_topic("fleet", bad)
    with pytest.raises(TopicError, match="not valid"):
        telemetry_topic(bad, "dev")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "edgefleet/v1",
        "edgefleet/v2/f/device/d/birth",
        "edgefleet/v1/f/device/d/unknown",
        "edgefleet/v1/f/device/d/blocks/req/extra",
        "edgefleet/v1/f/device/+/birth",
        "edgefleet/v1/#/device/d/birth",
        "edgefleet/v1/f/device//birth",
        "edgefleet/v1/f/artifact/ABC/blocks",
        f"edgefleet/v1/f/artifact/{DIGEST.upper()}/blocks",
        f"edgefleet/v1/f/artifact/{DIGEST}/blocks/x",
        "edgefleet/v1/f/other/d/birth",
        "x" * 300,
    ],
)
def test_parse_refuses_foreign_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_parse_topic_only_raises_topic_error(topic: str) -> None:
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return
    assert parsed.fleet in topic


def test_bad_digest_is_refused() -> None:
    with pytest.raises(TopicError, match="64 lower-case hex"):
        artifact_blocks_topic("f", "abc")


def test_controller_filters_cover_every_uplink() -> None:
    filters = controller_filters()
    assert "edgefleet/v1/+/device/+/telemetry" in filters
    assert "edgefleet/v1/+/device/+/blocks/req" in filters
    assert not any(f.endswith("/cmd") for f in filters)
    assert len(filters) == 5
    shared = controller_filters("plant-a", shared_group="ctl")
    assert shared[0].startswith("$share/ctl/edgefleet/v1/plant-a/device/+/")
    with pytest.raises(TopicError):
        controller_filters(shared_group="a/b")
    with pytest.raises(TopicError):
        controller_filters("#")


def test_device_filters_and_acl_lines() -> None:
    assert device_filters("f", "d") == ("edgefleet/v1/f/device/d/cmd",)
    acl = device_acl_patterns()
    assert "pattern write edgefleet/v1/+/device/%u/telemetry" in acl
    assert "pattern write edgefleet/v1/+/device/%u/status" in acl
    assert "pattern read edgefleet/v1/+/device/%u/cmd" in acl
    assert "pattern read edgefleet/v1/+/artifact/+/blocks" in acl
    assert all(line.startswith("pattern ") for line in acl)


def test_specs_match_the_design() -> None:
    assert TOPIC_SPECS[TopicKind.STATUS].retain
    assert TOPIC_SPECS[TopicKind.COMMAND].qos == 1
    assert not any(spec.retain for kind, spec in TOPIC_SPECS.items() if kind is not TopicKind.STATUS)
