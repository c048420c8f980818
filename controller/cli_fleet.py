"""`edgefleet fleet ...` and `edgefleet class ...`: fleets and device classes (with their profiles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.controller.cli_common import JsonOpt, emit, guarded, open_registry
from edgefleet.protocols.profile import load_profile

__all__ = ["class_app", "fleet_app"]

fleet_app = typer.Typer(help="Create and list fleets.", no_args_is_help=True)
class_app = typer.Typer(help="Add, list and show device classes and their profiles.", no_args_is_help=True)


@fleet_app.command("create")
@guarded
def fleet_create(ctx: typer.Context, name: Annotated[str, typer.Argument(help="fleet name")]) -> None:
    """Create a fleet (a topic namespace for a set of devices)."""
    fleet = open_registry(ctx).create_fleet(name)
    typer.echo(f"fleet {fleet.name} created")


@fleet_app.command("list")
@guarded
def fleet_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List fleets and how many devices each holds."""
    rows = [{"name": f.name, "devices": n, "created_at": f.created_at} for f, n in open_registry(ctx).list_fleets()]
    emit(rows, columns=["name", "devices", "created_at"], as_json=as_json, title="fleets")


@class_app.command("add")
@guarded
def class_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="class name (the profile's name is replaced by it)")],
    profile: Annotated[Path, typer.Option("--profile", help="device profile TOML file")],
) -> None:
    """Add a device class from a profile file (storage, RAM, latency budget, threads, accuracy rule)."""
    loaded = load_profile(profile)
    if loaded.name != name:
        loaded = loaded.model_validate({**loaded.model_dump(), "name": name})
    row = open_registry(ctx).add_class(loaded, name=name)
    typer.echo(f"class {row.name} added from {profile}")


@class_app.command("list")
@guarded
def class_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List device classes with their budgets and device counts."""
    rows = []
    for row, count in open_registry(ctx).list_classes():
        profile = json.loads(row.profile_json)
        rows.append(
            {
                "name": row.name,
                "devices": count,
                "storage_budget_bytes": profile.get("storage_budget_bytes"),
                "ram_budget_bytes": profile.get("ram_budget_bytes"),
                "latency_budget_ms": profile.get("latency_budget_ms"),
                "last_version": row.last_version,
            }
        )
    emit(
        rows,
        columns=["name", "devices", "storage_budget_bytes", "ram_budget_bytes", "latency_budget_ms", "last_version"],
        as_json=as_json,
        title="device classes",
    )


@class_app.command("show")
@guarded
def class_show(ctx: typer.Context, name: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """Show one class: its whole profile."""
    row, profile = open_registry(ctx).get_class(name)
    value = {"name": row.name, "last_version": row.last_version, "created_at": row.created_at, "profile": profile}
    rows = [{"field": k, "value": v} for k, v in profile.model_dump().items()]
    rows.append({"field": "last_version", "value": row.last_version})
    emit(rows, columns=["field", "value"], as_json=as_json, title=f"class {row.name}", json_value=value)
