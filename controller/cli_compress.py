"""`edgefleet compress ...`: run a recipe on a model, or plan one for a device profile.

torch is imported inside the commands only, so that `edgefleet --help` never loads it.
"""

from __future__ import annotations

import typer

__all__ = ["compress_app"]

compress_app = typer.Typer(
    help="Compress a model with a recipe, or plan a recipe for a device class.", no_args_is_help=True
)


@compress_app.command("run")
def run() -> None:
    """Run a compression recipe on a model (not implemented yet)."""
    typer.echo("edgefleet compress run: not implemented yet", err=True)
    raise typer.Exit(1)
