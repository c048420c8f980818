"""`edgefleet device ...`: register devices (credentials shown once), list them, show one."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.controller.artifacts.keys import write_private_file
from edgefleet.controller.broker.config import reload_running_broker
from edgefleet.controller.cli.common import JsonOpt, emit, fail, guarded, open_registry, settings_of, to_jsonable
from edgefleet.controller.config import Settings
from edgefleet.controller.data.registry import DeviceCredential, Registry
from edgefleet.controller.data.views import device_detail
from edgefleet.controller.errors import ConfigError
from edgefleet.protocols.credentials_file import CredentialRow, format_credentials

__all__ = ["device_app", "read_id_csv"]

device_app = typer.Typer(help="Register devices and see their state.", no_args_is_help=True)
MAX_CSV_BYTES = 16 * 1024 * 1024
MAX_COUNT = 100_000


def read_id_csv(path: Path) -> list[str]:
    """Device ids from a CSV file: the `id`/`device_id` column when there is a header, else the first column."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc})") from exc
    if len(raw) > MAX_CSV_BYTES:
        raise ConfigError(f"{path} is {len(raw)} bytes, more than {MAX_CSV_BYTES}")
    try:
        rows = [r for r in csv.reader(io.StringIO(raw.decode("utf-8-sig"))) if r and any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path} is not a UTF-8 CSV file ({exc})") from exc
    if not rows:
        raise ConfigError(f"{path} holds no device ids")
    header = [c.strip().lower() for c in rows[0]]
    column = 0
    for name in ("device_id", "id"):
        if name in header:
            column = header.index(name)
            rows = rows[1:]
            break
    return [r[column].strip() for r in rows if len(r) > column]


def _ids(device_id: list[str] | None, count: int | None, prefix: str | None, csv_file: Path | None) -> list[str]:
    given = sum(x is not None and x != [] for x in (device_id, count, csv_file))
    if given != 1:
        raise ConfigError("give exactly one of --id ID (repeatable), --count N --prefix P, or --csv FILE")
    if device_id:
        return device_id
    if csv_file is not None:
        return read_id_csv(csv_file)
    assert count is not None  # noqa: S101 - one of the three is set, checked above
    if not prefix:
        raise ConfigError("--count needs --prefix (ids become PREFIX-0001, PREFIX-0002, ...)")
    if not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"--count must be between 1 and {MAX_COUNT}")
    width = max(4, len(str(count)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, count + 1)]


def _write_credentials(path: Path, creds: list[DeviceCredential], host: str, port: int) -> None:
    rows = [CredentialRow(c.device_id, c.username, c.password, c.class_name, c.fleet, host, port) for c in creds]
    try:
        write_private_file(path, format_credentials(rows).encode())
    except (OSError, FileExistsError) as exc:
        raise ConfigError(f"cannot write credentials to {path} ({exc})") from exc


def _tell_the_broker(settings: Settings, registry: Registry) -> None:
    """mosquitto reads passwords and ACLs at start and on SIGHUP: reload the one `broker run` runs, or say how."""
    pid = reload_running_broker(settings, registry.broker_accounts())
    if pid is not None:
        typer.echo(f"the broker (pid {pid}) reloaded its passwords and ACLs: the new devices can connect", err=True)
    elif (settings.broker_dir / "passwd").exists():
        typer.echo(
            "note: no `edgefleet broker run` is running on this home; for a broker you run yourself, "
            "`edgefleet broker config` and send it SIGHUP so that it accepts the new devices",
            err=True,
        )


@device_app.command("register")
@guarded
def register(  # noqa: PLR0917 - typer passes every option by position
    ctx: typer.Context,
    class_name: Annotated[str, typer.Option("--class", help="device class")],
    device_id: Annotated[list[str] | None, typer.Option("--id", help="device id (repeatable)")] = None,
    count: Annotated[int | None, typer.Option("--count", help="how many devices to create")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="id prefix with --count")] = None,
    csv_file: Annotated[Path | None, typer.Option("--csv", help="CSV file of device ids")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the credentials to this CSV (mode 0600)")] = None,
    fleet: Annotated[str | None, typer.Option("--fleet", help="fleet (default: the configured one)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register devices; each one's password is shown (or written to --out) this once and stored only hashed."""
    settings = settings_of(ctx)
    ids = _ids(device_id, count, prefix, csv_file)
    if out is not None and out.exists():
        raise fail(f"{out} exists already: credentials are written once, to a new file")
    registry = open_registry(ctx)
    creds = registry.register_devices(ids, class_name=class_name, fleet=fleet or settings.fleet)
    _tell_the_broker(settings, registry)
    if out is not None:
        _write_credentials(out, creds, settings.mqtt_host, settings.mqtt_port)
        typer.echo(f"registered {len(creds)} device(s) in class {class_name}; credentials written to {out}")
        return
    if as_json:
        typer.echo(json.dumps(to_jsonable(creds), indent=2))
        return
    typer.echo(f"registered {len(creds)} device(s) in class {class_name}. Passwords are shown only now:")
    for c in creds:
        typer.echo(f"{c.device_id}\t{c.password}")


@device_app.command("list")
@guarded
def device_list(
    ctx: typer.Context,
    class_name: Annotated[str | None, typer.Option("--class", help="only this class")] = None,
    state: Annotated[str | None, typer.Option("--state", help="online or offline")] = None,
    fleet: Annotated[str | None, typer.Option("--fleet", help="only this fleet")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List devices with their state and running model."""
    if state not in {None, "online", "offline"}:
        raise fail(f"--state must be online or offline, not {state!r}")
    online = None if state is None else state == "online"
    devices = open_registry(ctx).list_devices(class_name=class_name, online=online, fleet=fleet)
    rows: list[dict[str, Any]] = [
        {
            "id": d.id,
            "class": d.class_name,
            "fleet": d.fleet,
            "state": "online" if d.online else "offline",
            "model_version": d.model_version,
            "last_seen": d.last_seen,
        }
        for d in devices
    ]
    emit(
        rows, columns=["id", "class", "fleet", "state", "model_version", "last_seen"], as_json=as_json, title="devices"
    )


@device_app.command("show")
@guarded
def device_show(ctx: typer.Context, device_id: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """Show one device: class, state, running model, slot state, last telemetry, recent jobs."""
    detail = device_detail(open_registry(ctx), device_id)
    rows = [{"field": k, "value": v} for k, v in detail.items() if not isinstance(v, list | dict)]
    emit(rows, columns=["field", "value"], as_json=as_json, title=f"device {device_id}", json_value=detail)
    if not as_json and detail.get("jobs"):
        emit(
            detail["jobs"],
            columns=["id", "artifact_id", "state", "result_code", "detail", "updated_at"],  # the reason, in words
            as_json=False,
            title="recent jobs",
        )
