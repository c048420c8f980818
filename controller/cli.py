"""The operator's command line, `edgefleet`: one typer app that mounts one sub-app per concern.

Nothing here imports torch at module level: `edgefleet --help` must stay fast and must work where the
compression stack is broken. Verbs that need torch import `edgefleet.compression` inside the command.
Exit codes: 0 ok, 1 failure (a clear message, never a traceback), 2 usage.
"""

from __future__ import annotations

import sys

import typer

from edgefleet.controller.cli_compress import compress_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgefleet",
    help="Compress models per device class, roll them out to IoT fleets over MQTT, watch them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(compress_app, name="compress")

_LATER = {
    "init": "create the edgefleet home: registry database and signing key",
    "fleet": "create and list fleets",
    "class": "add, list and show device classes and their profiles",
    "device": "register devices and see their state",
    "model": "add models to the registry",
    "artifact": "list and show compressed, signed artifacts",
    "deploy": "push an artifact to a device or a class",
    "broker": "write a Mosquitto config for the fleet, or run one",
    "serve": "run the controller service",
    "demo": "run the end-to-end demo",
}


def _not_yet(name: str, summary: str) -> None:
    def command() -> None:
        typer.echo(f"edgefleet {name}: not implemented yet", err=True)
        raise typer.Exit(1)

    command.__doc__ = f"{summary[0].upper()}{summary[1:]} (not implemented yet)."
    app.command(name=name)(command)


for _name, _summary in _LATER.items():
    _not_yet(_name, _summary)


def main() -> None:
    """Console entry point."""
    sys.exit(app())
