"""docs/protocol.md must agree with the code: links, topics, codes, buckets, ACL lines and example payloads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgefleet.protocols import LATENCY_BUCKETS_SECONDS, MessageKind, ProtocolError, ResultCode, decode
from edgefleet.protocols.schemas import SCHEMA_FILES
from edgefleet.protocols.topics import TOPIC_SPECS, device_acl_patterns

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_schema_is_linked_and_exists(text: str) -> None:
    for name in SCHEMA_FILES:
        assert f"(schemas/{name})" in text
    for link in re.findall(r"\(schemas/([^)]+)\)", text):
        assert (DOC.parent / "schemas" / link).exists(), link


def test_every_topic_has_a_row(text: str) -> None:
    rows = [line for line in text.splitlines() if line.startswith("| `edgefleet/v1/")]
    assert len(rows) == len(TOPIC_SPECS)
    for spec in TOPIC_SPECS.values():
        row = next(r for r in rows if r.split("|")[1].strip().endswith(f"/{spec.suffix}`"))
        cells = [cell.strip() for cell in row.split("|")]
        assert cells[3] == str(spec.qos)
        assert ("yes" in cells[4]) == spec.retain


def test_result_codes_table(text: str) -> None:
    for code in ResultCode:
        assert f"| {code.value} | `{code.name.lower()}` |" in text


def test_buckets_and_acl_lines(text: str) -> None:
    assert ", ".join(str(bound) for bound in LATENCY_BUCKETS_SECONDS) in text.replace("\n  ", " ")
    for line in device_acl_patterns():
        assert line in text


def _json_examples(text: str) -> list[object]:
    examples: list[object] = []
    decoder = json.JSONDecoder()
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL):
        if "..." in block:
            continue  # shortened on purpose
        position = 0
        while position < len(block.strip()):
            value, end = decoder.raw_decode(block, position)
            examples.append(value)
            position = end + (len(block[end:]) - len(block[end:].lstrip()))
    return examples


def test_example_payloads_parse(text: str) -> None:
    examples = _json_examples(text)
    assert len(examples) >= 8
    for example in examples:
        payload = json.dumps(example).encode()
        parsed = []
        for kind in MessageKind:
            try:
                parsed.append(decode(kind, payload))
            except ProtocolError:
                continue
        assert parsed, f"example does not parse as any message: {example}"


def test_mermaid_diagrams(text: str) -> None:
    assert text.count("```mermaid") >= 4
    for title in ("First connect", "Deploy", "Interrupted and resumed download", "Rollback"):
        assert f"### {title}" in text
