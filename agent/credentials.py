"""Read the device credentials file that `edgefleet device register --out FILE` writes (CSV, one device a row).

The simulator uses it so that simulated devices log in with their own passwords and the broker's per-device ACLs
apply to them, as they would to real devices; `edgefleet-agent run --credentials` takes its own row. The format is the
contract's (`edgefleet.protocols.credentials_file`); `class` filters rows when given. Where the file names the fleet,
broker host and port, the agent connects there unless told otherwise (`connection_of`).
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.errors import AgentError
from edgefleet.protocols.credentials_file import CredentialRow, CredentialsFileError, parse_credentials

__all__ = ["CredentialRow", "connection_of", "read_credentials"]


def read_credentials(path: Path, *, device_class: str | None = None) -> list[CredentialRow]:
    """The rows of `path` (for `device_class` only, when the file names classes); a clear `AgentError` otherwise.

    The format is the contract's (`edgefleet.protocols.credentials_file`).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AgentError(f"{path}: cannot read credentials ({exc.strerror or exc})") from exc
    try:
        rows = parse_credentials(raw, source=str(path))
    except CredentialsFileError as exc:
        raise AgentError(str(exc)) from exc
    found = [r for r in rows if device_class is None or r.device_class is None or r.device_class == device_class]
    if not found:
        raise AgentError(f"{path}: no credentials" + (f" for class {device_class}" if device_class else ""))
    return found


def connection_of(credentials: list[CredentialRow], *, source: Path) -> tuple[str | None, str | None, int | None]:
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
