"""The operator's command line, `edgefleet`: one typer app that mounts one sub-app per concern.

Nothing here imports torch at module level: `edgefleet --help` must stay fast and must work where the
compression stack is broken. Verbs that need torch import `edgefleet.compression` inside the command.
Exit codes: 0 ok, 1 failure (a clear message, never a traceback), 2 usage.

Settings come from the root options, then `EDGEFLEET_*` environment variables, then the TOML file
(`<home>/edgefleet.toml` or `--config`), e.g. `edgefleet --home /srv/ef device list --json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.controller.cli.common import CliState, JsonOpt, guarded, settings_of, to_jsonable
from edgefleet.controller.cli.compress import compress_app
from edgefleet.controller.cli.device import device_app
from edgefleet.controller.cli.fleet import class_app, fleet_app
from edgefleet.controller.cli.model import artifact_app, model_app
from edgefleet.controller.cli.ops import broker_app, deploy, serve
from edgefleet.controller.cli.recompress import recompress_app
from edgefleet.controller.cli.rollout import rollout_app
from edgefleet.controller.data.home import init_home
from edgefleet.controller.demo.cli import demo

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgefleet",
    help="Compress models per device class, roll them out to IoT fleets over MQTT, watch them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: "[policy]" and "[env ...]" must not be read as markup
)


@app.callback()
def root(  # noqa: PLR0917 - typer passes options by position
    ctx: typer.Context,
    home: Annotated[
        Path | None, typer.Option("--home", help="edgefleet home (env EDGEFLEET_HOME; default ~/.edgefleet)")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML settings file (env EDGEFLEET_CONFIG; default HOME/edgefleet.toml)"),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL (env EDGEFLEET_DATABASE_URL; default SQLite in HOME)"),
    ] = None,
    mqtt_host: Annotated[
        str | None, typer.Option("--mqtt-host", help="broker host (env EDGEFLEET_MQTT_HOST; default 127.0.0.1)")
    ] = None,
    mqtt_port: Annotated[
        int | None, typer.Option("--mqtt-port", help="broker port (env EDGEFLEET_MQTT_PORT; default 1883)")
    ] = None,
    mqtt_username: Annotated[
        str | None, typer.Option("--mqtt-username", help="broker username (env EDGEFLEET_MQTT_USERNAME)")
    ] = None,
    mqtt_password: Annotated[
        str | None, typer.Option("--mqtt-password", help="broker password (env EDGEFLEET_MQTT_PASSWORD)")
    ] = None,
    fleet: Annotated[
        str | None, typer.Option("--fleet", help="fleet to serve (env EDGEFLEET_FLEET; default 'default')")
    ] = None,
    shared_subscriptions: Annotated[
        bool | None,
        typer.Option(
            "--shared-subscriptions/--no-shared-subscriptions",
            help="MQTT 5 shared subscriptions (env EDGEFLEET_SHARED_SUBSCRIPTIONS; default off)",
        ),
    ] = None,
) -> None:
    """Settings given here win over EDGEFLEET_* variables, which win over the TOML file.

    Every setting of the TOML file also reads EDGEFLEET_<NAME>, e.g. EDGEFLEET_METRICS_PORT (default 9464).
    """
    ctx.obj = CliState(
        flags={
            "home": home,
            "database_url": database_url,
            "mqtt_host": mqtt_host,
            "mqtt_port": mqtt_port,
            "mqtt_username": mqtt_username,
            "mqtt_password": mqtt_password,
            "fleet": fleet,
            "shared_subscriptions": shared_subscriptions,
        },
        config_file=config,
    )


@app.command("init")
@guarded
def init(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Create the edgefleet home: registry database (migrated), Ed25519 signing key, the default fleet."""
    summary = init_home(settings_of(ctx))
    if as_json:
        typer.echo(json.dumps(to_jsonable(summary), indent=2))
        return
    typer.echo(f"edgefleet home {summary.home} ready")
    typer.echo(f"  registry    {summary.database}")
    typer.echo(f"  signing key {summary.key_path} (key id {summary.key_id}; public key {summary.public_key_path})")
    typer.echo(f"  fleet       {summary.fleet}")


app.add_typer(fleet_app, name="fleet")
app.add_typer(class_app, name="class")
app.add_typer(device_app, name="device")
app.add_typer(model_app, name="model")
app.add_typer(artifact_app, name="artifact")
app.command("deploy")(deploy)
app.add_typer(broker_app, name="broker")
app.command("serve")(serve)
app.add_typer(compress_app, name="compress")
app.add_typer(rollout_app, name="rollout")
app.add_typer(recompress_app, name="recompress")


app.command("demo")(demo)


def main() -> None:
    """Console entry point."""
    sys.exit(app())
