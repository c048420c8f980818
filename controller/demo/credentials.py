"""The demo's device passwords: each simulated device registered once, its password kept in a 0600 CSV per class.

`Registry.register_devices` hands a device's password out once and stores only its hash, so the demo writes it
straight into `<home>/credentials/<class>.csv`, in the columns `edgefleet device register --out` writes and
`edgefleet-agent simulate --credentials` reads. A kept home (`--home`, `--keep-home`) run again reuses that file:
devices already registered keep their passwords, devices new to this run are registered and added to it. A device
registered in the home whose password is not in the file (a home from before the demo kept passwords, or a file
deleted by hand) cannot log in: the demo says so and asks for a fresh home rather than guessing.

Example::

    path = ensure_credentials(registry, class_name="rpi4", fleet="demo", ids=simulated_ids("rpi4", 10),
                              path=credentials_path(home, "rpi4"), mqtt_host="127.0.0.1", mqtt_port=1883)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.artifacts.keys import write_private_file
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.errors import ConfigError
from edgefleet.protocols.credentials_file import (
    CredentialRow,
    CredentialsFileError,
    format_credentials,
    parse_credentials,
)

__all__ = ["KeptCredential", "credentials_path", "ensure_credentials", "read_kept_credentials"]


@dataclass(frozen=True, slots=True)
class KeptCredential:
    device_id: str
    username: str
    password: str
    fleet: str
    class_name: str


def credentials_path(home: Path, class_name: str) -> Path:
    """Where the demo keeps the passwords of one class's simulated devices."""
    return home / "credentials" / f"{class_name}.csv"


def read_kept_credentials(path: Path) -> dict[str, KeptCredential]:
    """The rows of a credentials CSV the demo wrote, by device id; empty when there is no file yet."""
    if not path.exists():
        return {}
    try:
        rows = parse_credentials(path.read_bytes(), source=str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read the demo's device credentials {path} ({exc.strerror or exc})") from exc
    except CredentialsFileError as exc:
        raise ConfigError(f"{exc}; use a fresh --home") from exc
    kept = {}
    for row in rows:
        if not row.fleet or not row.device_class:
            raise ConfigError(f"{path} has a row without its fleet or class; use a fresh --home")
        kept[row.device_id] = KeptCredential(row.device_id, row.username, row.password, row.fleet, row.device_class)
    return kept


def _write(path: Path, rows: Sequence[KeptCredential], *, mqtt_host: str, mqtt_port: int) -> None:
    text = format_credentials(
        CredentialRow(r.device_id, r.username, r.password, r.class_name, r.fleet, mqtt_host, mqtt_port) for r in rows
    )
    try:
        write_private_file(path, text.encode())
    except OSError as exc:
        raise ConfigError(f"cannot write the demo's device credentials {path} ({exc.strerror or exc})") from exc


def ensure_credentials(
    registry: Registry,
    *,
    class_name: str,
    fleet: str,
    ids: Sequence[str],
    path: Path,
    mqtt_host: str,
    mqtt_port: int,
) -> Path:
    """Register the devices of `ids` not registered yet and write every kept password of the class to `path`.

    The file holds the rows sorted by device id (the simulator takes the first `--devices` of them), and this run's
    broker address (the port changes from run to run; the simulator takes `--host`/`--port` anyway).
    """
    kept = read_kept_credentials(path)
    registered = {d.id for d in registry.list_devices(class_name=class_name)}
    lost = sorted(i for i in ids if i in registered and i not in kept)
    if lost:
        raise ConfigError(
            f"device(s) {', '.join(lost[:5])} of class {class_name} are registered in this home, but their passwords "
            f"are not in {path} (a password is shown only once, when a device is registered): run the demo with a "
            "fresh --home"
        )
    missing = [i for i in ids if i not in registered]
    if missing:
        for c in registry.register_devices(missing, class_name=class_name, fleet=fleet):
            kept[c.device_id] = KeptCredential(c.device_id, c.username, c.password, c.fleet, c.class_name)
    # Written on every run, so that a new password is on disk as soon as its device is registered.
    _write(path, [kept[i] for i in sorted(kept)], mqtt_host=mqtt_host, mqtt_port=mqtt_port)
    return path
