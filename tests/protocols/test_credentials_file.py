"""The device credentials file format (protocols/credentials_file.py): round trip, and what broken files get."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.protocols.credentials_file import (
    MAX_BYTES,
    CredentialRow,
    CredentialsFileError,
    format_credentials,
    parse_credentials,
)

ROWS = [
    CredentialRow("pi-1", "pi-1", 's3cret,with"quote', "rpi4", "plant-a", "10.0.0.5", 1884),
    CredentialRow("pi-2", "pi-2", "other", None, None, None, None),
]


def test_what_is_written_reads_back_the_same() -> None:
    text = format_credentials(ROWS)
    assert text.splitlines()[0] == "device_id,username,password,fleet,class,mqtt_host,mqtt_port"
    assert parse_credentials(text.encode(), source="f.csv") == ROWS


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b"device_id,username\npi,pi\n", "lacks column(s) password"),
        (b"device_id,username,password\npi,,x\n", "f.csv:2: empty device_id, username or password"),
        (b"device_id,username,password,mqtt_port\npi,pi,x,99999\n", "mqtt_port '99999' is not a port number"),
        (b"\xff\xfe\x00junk", "not a UTF-8 CSV credentials file"),
        (b"x" * (MAX_BYTES + 1), "larger than"),
    ],
)
def test_broken_files_are_one_clear_error(raw: bytes, said: str) -> None:
    with pytest.raises(CredentialsFileError, match=said.replace("(", r"\(").replace(")", r"\)")):
        parse_credentials(raw, source="f.csv")


@given(st.binary(max_size=2000))
def test_any_bytes_give_rows_or_a_credentials_error(raw: bytes) -> None:
    try:
        rows = parse_credentials(raw, source="fuzz")
    except CredentialsFileError:
        return
    assert all(r.device_id and r.username and r.password for r in rows)
