"""The device credentials file: what `edgefleet device register --out FILE` writes and a device (or the simulator)
reads. It crosses from the controller to the devices, so its format is part of the contract, spelled once here.

A UTF-8 CSV with a header line and one device a row. Columns, in this order: `device_id`, `username`, `password`
(required, non-empty), then `fleet`, `class`, `mqtt_host`, `mqtt_port` (optional: empty, or absent in files written
by hand; a port is 1-65535). A file is at most 16 MiB. Errors are `CredentialsFileError` naming the file and line.

Example::

    rows = parse_credentials(Path("line3.csv").read_bytes(), source="line3.csv")
    text = format_credentials(rows)              # the same rows, as `device register` writes them
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.protocols.errors import ProtocolError

__all__ = ["COLUMNS", "MAX_BYTES", "REQUIRED", "CredentialRow", "CredentialsFileError", "format_credentials",
           "parse_credentials"]  # fmt: skip

COLUMNS = ("device_id", "username", "password", "fleet", "class", "mqtt_host", "mqtt_port")
REQUIRED = COLUMNS[:3]
MAX_BYTES = 16 * 1024 * 1024


class CredentialsFileError(ProtocolError):
    """A credentials file is too large, not UTF-8 CSV, lacks a column, or has an empty or broken field."""


@dataclass(frozen=True, slots=True)
class CredentialRow:
    """One device's row: its login and, where the file says, its fleet, class and broker."""

    device_id: str
    username: str
    password: str
    device_class: str | None = None
    fleet: str | None = None
    mqtt_host: str | None = None
    mqtt_port: int | None = None


def parse_credentials(raw: bytes, *, source: str) -> list[CredentialRow]:
    """Every row of a credentials file, checked; `source` names it in errors."""
    if len(raw) > MAX_BYTES:
        raise CredentialsFileError(f"{source}: credentials file is larger than {MAX_BYTES} bytes")
    try:
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
        missing = [name for name in REQUIRED if name not in (reader.fieldnames or [])]
        if missing:
            raise CredentialsFileError(f"{source}: credentials file lacks column(s) {', '.join(missing)}")
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CredentialsFileError(f"{source}: not a UTF-8 CSV credentials file ({exc})") from exc
    found: list[CredentialRow] = []
    for number, row in enumerate(rows, start=2):
        values = {name: (row.get(name) or "").strip() for name in REQUIRED}
        if not all(values.values()):
            raise CredentialsFileError(f"{source}:{number}: empty device_id, username or password")
        port_text = (row.get("mqtt_port") or "").strip()
        if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise CredentialsFileError(f"{source}:{number}: mqtt_port {port_text[:20]!r} is not a port number")
        found.append(
            CredentialRow(
                values["device_id"],
                values["username"],
                values["password"],
                device_class=(row.get("class") or "").strip() or None,
                fleet=(row.get("fleet") or "").strip() or None,
                mqtt_host=(row.get("mqtt_host") or "").strip() or None,
                mqtt_port=int(port_text) if port_text else None,
            )
        )
    return found


def format_credentials(rows: Iterable[CredentialRow]) -> str:
    """The file's text: the header line, then one line per row (empty fields where a row says nothing)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for r in rows:
        port = "" if r.mqtt_port is None else r.mqtt_port
        writer.writerow([r.device_id, r.username, r.password, r.fleet or "", r.device_class or "", r.mqtt_host or "",
                         port])  # fmt: skip
    return out.getvalue()
