"""Read the device credentials file that `edgefleet device register --out FILE` writes (CSV, one device a row).

The simulator uses it so that simulated devices log in with their own passwords and the broker's per-device ACLs
apply to them, as they would to real devices. Columns: device_id, username, password, fleet, class, mqtt_host,
mqtt_port (only the first three are required; `class` filters rows when given). Where the file names the fleet,
broker host and port, `edgefleet-agent simulate` connects there unless told otherwise (`connection_of`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.errors import AgentError

__all__ = ["DeviceCredential", "connection_of", "read_credentials"]

MAX_CREDENTIALS_BYTES = 16 * 1024 * 1024
REQUIRED = ("device_id", "username", "password")


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    device_id: str
    username: str
    password: str
    device_class: str | None
    fleet: str | None = None
    mqtt_host: str | None = None
    mqtt_port: int | None = None


def read_credentials(path: Path, *, device_class: str | None = None) -> list[DeviceCredential]:
    """The rows of `path` (for `device_class` only, when the file names classes); a clear `AgentError` otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AgentError(f"{path}: cannot read credentials ({exc.strerror or exc})") from exc
    if len(raw) > MAX_CREDENTIALS_BYTES:
        raise AgentError(f"{path}: credentials file is larger than {MAX_CREDENTIALS_BYTES} bytes")
    try:
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
        missing = [name for name in REQUIRED if name not in (reader.fieldnames or [])]
        if missing:
            raise AgentError(f"{path}: credentials file lacks column(s) {', '.join(missing)}")
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise AgentError(f"{path}: not a UTF-8 CSV credentials file ({exc})") from exc
    found: list[DeviceCredential] = []
    for number, row in enumerate(rows, start=2):
        values = {name: (row.get(name) or "").strip() for name in REQUIRED}
        if not all(values.values()):
            raise AgentError(f"{path}:{number}: empty device_id, username or password")
        cls = (row.get("class") or "").strip() or None
        if device_class is not None and cls is not None and cls != device_class:
            continue
        port_text = (row.get("mqtt_port") or "").strip()
        if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise AgentError(f"{path}:{number}: mqtt_port {port_text[:20]!r} is not a port number")
        found.append(
            DeviceCredential(
                values["device_id"],
                values["username"],
                values["password"],
                cls,
                fleet=(row.get("fleet") or "").strip() or None,
                mqtt_host=(row.get("mqtt_host") or "").strip() or None,
                mqtt_port=int(port_text) if port_text else None,
            )
        )
    if not found:
        raise AgentError(f"{path}: no credentials" + (f" for class {device_class}" if device_class else ""))
    return found


def connection_of(credentials: list[DeviceCredential], *, source: Path) -> tuple[str | None, str | None, int | None]:
    """The (fleet, host, port) the rows agree on (None where no row names one); rows that disagree are an error."""
    found: list[str | int | None] = []
    for name in ("fleet", "mqtt_host", "mqtt_port"):
        values = {getattr(c, name) for c in credentials} - {None}
        if len(values) > 1:
            shown = ", ".join(sorted(str(v) for v in values)[:4])
            raise AgentError(f"{source}: rows name different {name} values ({shown}); give --{name.split('_')[-1]}")
        found.append(values.pop() if values else None)
    fleet, host, port = found
    return (
        fleet if isinstance(fleet, str) else None,
        host if isinstance(host, str) else None,
        port if isinstance(port, int) else None,
    )
