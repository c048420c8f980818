"""Read the device credentials file that `edgefleet device register --out FILE` writes (CSV, one device a row).

The simulator uses it so that simulated devices log in with their own passwords and the broker's per-device ACLs
apply to them, as they would to real devices. Columns: device_id, username, password, fleet, class, mqtt_host,
mqtt_port (only the first three are required; `class` filters rows when given).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.errors import AgentError

__all__ = ["DeviceCredential", "read_credentials"]

MAX_CREDENTIALS_BYTES = 16 * 1024 * 1024
REQUIRED = ("device_id", "username", "password")


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    device_id: str
    username: str
    password: str
    device_class: str | None


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
        found.append(DeviceCredential(values["device_id"], values["username"], values["password"], cls))
    if not found:
        raise AgentError(f"{path}: no credentials" + (f" for class {device_class}" if device_class else ""))
    return found
