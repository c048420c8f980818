"""`edgefleet deploy`, `edgefleet broker config|run` and `edgefleet serve`: the verbs that talk to MQTT."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, TextIO

import typer

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.broker.config import (
    forget_broker_pid,
    managed_broker,
    record_broker_pid,
    write_broker_config,
)
from edgefleet.controller.cli.common import JsonOpt, emit, fail, guarded, open_registry, settings_of
from edgefleet.controller.config import Settings, convert_setting
from edgefleet.controller.data.views import fleet_line
from edgefleet.controller.errors import BrokerError, ControllerError
from edgefleet.controller.service.deploy import Deployer
from edgefleet.controller.service.mqtt import MqttClient

if TYPE_CHECKING:
    from edgefleet.controller.service.app import ControllerApp

__all__ = ["broker_app", "deploy", "serve"]

broker_app = typer.Typer(help="Write a Mosquitto config for the fleet, or run one.", no_args_is_help=True)


@guarded
def deploy(  # noqa: PLR0917 - typer passes options by position
    ctx: typer.Context,
    artifact: Annotated[str, typer.Argument(help="artifact id, or class:version")],
    device: Annotated[list[str] | None, typer.Option("--device", help="device id (repeatable)")] = None,
    class_name: Annotated[str | None, typer.Option("--class", help="every device of this class")] = None,
    expires_in: Annotated[float, typer.Option("--expires-in", help="hours the command stays valid")] = 24.0,
    as_json: JsonOpt = False,
) -> None:
    """Push an artifact to devices now (signed DeployCommand, QoS 1); waves come with rollouts."""
    settings = settings_of(ctx)
    registry = open_registry(ctx)
    catalog = ArtifactCatalog(registry.db, store=ArtifactStore(settings.store_dir), actor=registry.actor)
    username, password = settings.mqtt_credentials(cli=True)
    client = MqttClient(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        client_id=f"{settings.mqtt_client_id}-cli",
        username=username,
        password=password,
        session_expiry_s=0,
        tls=settings.mqtt_tls,
    )
    deployer = Deployer(registry.db, catalog=catalog, publisher=client, actor=registry.actor)
    client.connect(timeout=10)
    try:
        results = deployer.deploy(
            artifact, device_ids=device, class_name=class_name, expires_in=dt.timedelta(hours=expires_in)
        )
    finally:
        client.close()
    rows = [{"job": r.job_id, "device": r.device_id, "state": r.state, "error": r.error} for r in results]
    emit(rows, columns=["job", "device", "state", "error"], as_json=as_json, title="deploy jobs")
    if any(r.error for r in results):
        raise typer.Exit(1)


TlsCertOpt = Annotated[
    Path | None,
    typer.Option("--tls-cert", help="the broker's certificate (PEM): a TLS listener (setting broker_tls_cert)"),
]
TlsKeyOpt = Annotated[
    Path | None, typer.Option("--tls-key", help="the broker's private key (PEM) (setting broker_tls_key)")
]
TlsCaOpt = Annotated[
    Path | None,
    typer.Option("--tls-ca", help="CA file client certificates chain to (setting broker_tls_ca, else mqtt_tls_ca)"),
]
RequireCertOpt = Annotated[
    bool | None,
    typer.Option(
        "--require-certificate/--no-require-certificate",
        help="refuse TLS clients without a certificate signed by the CA (setting broker_tls_require_certificate)",
        show_default=False,
    ),
]


def _with_broker_tls(
    settings: Settings, cert: Path | None, key: Path | None, ca: Path | None, require: bool | None
) -> Settings:
    """The settings with the `broker config|run` TLS options applied (checked as the settings themselves are)."""
    flags = {
        "broker_tls_cert": cert,
        "broker_tls_key": key,
        "broker_tls_ca": ca,
        "broker_tls_require_certificate": require,
    }
    given = {name: convert_setting(name, value, "option") for name, value in flags.items() if value is not None}
    return dataclasses.replace(settings, **given) if given else settings


@broker_app.command("config")
@guarded
def broker_config(  # noqa: PLR0917 - typer passes options by position
    ctx: typer.Context,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: TlsCaOpt = None,
    require_certificate: RequireCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write mosquitto.conf, the password file and the ACL for every registered device (TLS with --tls-cert)."""
    settings = _with_broker_tls(settings_of(ctx), tls_cert, tls_key, tls_ca, require_certificate)
    files = write_broker_config(settings, open_registry(ctx).broker_accounts())
    tls = settings.broker_tls
    value = {
        "config": str(files.config),
        "password_file": str(files.password_file),
        "acl_file": str(files.acl_file),
        "devices": files.devices,
        "listener": f"{settings.mqtt_host}:{settings.mqtt_port}",
        "tls": tls is not None,
        "require_certificate": tls is not None and tls.require_certificate,
    }
    if as_json:
        typer.echo(json.dumps(value, indent=2))
        return
    kind = "TLS" if tls is not None else "plaintext"
    typer.echo(f"wrote {files.config} ({files.devices} device(s), {kind} listener {value['listener']})")
    if tls is not None and settings.mqtt_tls is None:
        typer.echo("the controller needs mqtt_tls_ca (EDGEFLEET_MQTT_TLS_CA) to connect to a TLS listener")
    typer.echo(f"run it with `edgefleet broker run` or `mosquitto -c {files.config}`")


def _wait_for_signal(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@broker_app.command("run")
@guarded
def broker_run(
    ctx: typer.Context,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: TlsCaOpt = None,
    require_certificate: RequireCertOpt = None,
) -> None:
    """Refresh the config from the registry and run Mosquitto with it until interrupted."""
    settings = _with_broker_tls(settings_of(ctx), tls_cert, tls_key, tls_ca, require_certificate)
    write_broker_config(settings, open_registry(ctx).broker_accounts())
    broker = managed_broker(settings)
    try:
        broker.start()
    except BrokerError as exc:
        raise fail(f"{exc} (log: {broker.log_path})") from exc
    typer.echo(f"mosquitto pid {broker.pid} on {broker.host}:{broker.port}; Ctrl-C stops it")
    if broker.pid is not None:
        record_broker_pid(settings, broker.pid)  # `device register` reloads this broker's passwords and ACLs
    stop = threading.Event()

    def watch() -> None:
        broker.wait()
        stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _wait_for_signal(stop)
        code = None if broker.running else broker.wait(timeout=0)
    finally:
        broker.stop()
        forget_broker_pid(settings)
    if code:  # mosquitto ended by itself, with an error: say so and exit non-zero
        raise fail(f"mosquitto exited with code {code}: {_log_tail(broker.log_path)} (log: {broker.log_path})")
    typer.echo("mosquitto stopped")


def _log_tail(path: Path) -> str:
    """The last line of mosquitto's log that says what went wrong (or 'see the log')."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "see the log"
    return lines[-1][-300:] if lines else "see the log"


@guarded
def serve(
    ctx: typer.Context,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Prometheus port")] = None,
    recompress: Annotated[
        bool | None,
        typer.Option(
            "--recompress/--no-recompress",
            help="run the recompression loop (class [policy] tables); default: the `recompress` setting, on",
            show_default=False,
        ),
    ] = None,
    recompress_interval: Annotated[
        float | None,
        typer.Option(
            "--recompress-interval",
            min=0.1,
            max=3600.0,
            help="seconds between two checks of the recompression triggers (default: the setting, 5)",
        ),
    ] = None,
    progress_every: Annotated[
        float,
        typer.Option(
            "--progress-every", min=0.0, help="seconds between fleet summary lines, printed when they change (0: none)"
        ),
    ] = 30.0,
) -> None:
    """Run the controller (MQTT service, rollouts, recompression loop, metrics endpoint) until SIGINT or SIGTERM."""
    from dataclasses import replace

    from edgefleet.controller.service.app import ControllerApp

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_of(ctx)
    if metrics_port is not None:
        settings = replace(settings, metrics_port=metrics_port)
    if recompress is not None:
        settings = replace(settings, recompress=recompress)
    if recompress_interval is not None:
        settings = replace(settings, recompress_interval_s=recompress_interval)
    app = ControllerApp(settings, recompress=settings.recompress, recompress_interval_s=settings.recompress_interval_s)
    lock = _serve_lock(settings.home)
    app.start()
    typer.echo(
        f"serving fleet {settings.fleet} from {settings.mqtt_host}:{settings.mqtt_port}; "
        f"metrics on http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    )
    typer.echo(app.recompression_status())
    stop = threading.Event()
    if progress_every > 0:
        threading.Thread(
            target=_summaries, args=(app, settings.fleet, progress_every, stop), name="serve-progress", daemon=True
        ).start()
    try:
        _wait_for_signal(stop)
    finally:
        stop.set()
        app.stop()
    lock.close()
    typer.echo(f"stopped; {app.service.stats()['recorded_messages']} telemetry message(s) recorded")


def _summaries(app: ControllerApp, fleet: str, every: float, stop: threading.Event) -> None:
    """A fleet summary line every `every` seconds when it changed (a log that says what the controller sees)."""
    last = ""
    while not stop.wait(every):
        try:
            line = fleet_line(app.db, fleet)
        except ControllerError as exc:  # a busy database: say so, try again next time
            line = f"fleet {fleet}: cannot read the registry ({exc})"
        if line != last:
            typer.echo(f"{time.strftime('%H:%M:%S')} {line}")
            last = line


def _serve_lock(home: Path) -> TextIO:
    """An exclusive lock on HOME/serve.lock, held while `serve` runs: a second one on the same home would take over
    the first one's MQTT client id (the broker disconnects the older session), so it refuses before connecting."""
    import fcntl

    path = home / "serve.lock"
    try:
        handle = path.open("a+", encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot open {path} ({exc.strerror or exc})") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise fail(
            f"another `edgefleet serve` (pid {holder[:20]}) is running on the home {home}: stop it first "
            "(a second one would take over its MQTT client id)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
