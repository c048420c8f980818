"""`edgefleet fleet ...` and `edgefleet class ...`: fleets and device classes (with their profiles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.controller.cli.common import JsonOpt, emit, guarded, open_registry
from edgefleet.controller.recompress.policy import RecompressionPolicy, parse_policy
from edgefleet.protocols.profile import DeviceProfile, parse_profile, read_profile_file

__all__ = ["class_app", "fleet_app"]

fleet_app = typer.Typer(help="Create and list fleets.", no_args_is_help=True)
class_app = typer.Typer(help="Add, update, list and show device classes and their profiles.", no_args_is_help=True)


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


def _class_file(name: str, path: Path) -> tuple[DeviceProfile, RecompressionPolicy | None, str]:
    """The profile (renamed to `name`), the optional `[policy]` table of a class TOML (both checked first), and a
    note when the profile's own name differs (one file may serve several classes; the operator should know)."""
    document = read_profile_file(path)  # read once: the profile and the policy come from the same bytes
    loaded = parse_profile(document, source=str(path))
    note = ""
    if loaded.name != name:
        note = (
            f" (the profile calls itself {loaded.name!r}; here it is class {name!r}: devices join with --class {name})"
        )
        loaded = loaded.model_validate({**loaded.model_dump(), "name": name})
    return loaded, parse_policy(document, source=str(path)), note


def _policy_note(policy: RecompressionPolicy | None) -> str:
    if policy is None:
        return "no [policy] table: the recompression loop does not watch it"
    return f"recompression policy: {policy.mode}, latency over budget for {policy.latency_windows} windows"


@class_app.command("add")
@guarded
def class_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="class name (the profile's name is replaced by it)")],
    profile: Annotated[Path, typer.Option("--profile", help="device profile TOML file")],
) -> None:
    """Add a device class from a profile file ([profile] table; its [policy] table is the recompression policy)."""
    loaded, policy, note = _class_file(name, profile)
    row = open_registry(ctx).add_class(loaded, name=name, policy=policy)
    typer.echo(f"class {row.name} added from {profile}{note}; {_policy_note(policy)}")


@class_app.command("update")
@guarded
def class_update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="class name")],
    profile: Annotated[Path, typer.Option("--profile", help="device profile TOML file")],
) -> None:
    """Replace a class's profile and recompression policy with those of the file (no [policy] table: none)."""
    loaded, policy, note = _class_file(name, profile)
    row = open_registry(ctx).update_class(loaded, name=name, policy=policy)
    typer.echo(f"class {row.name} updated from {profile}{note}; {_policy_note(policy)}")


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
    registry = open_registry(ctx)
    row, profile = registry.get_class(name)
    policy = registry.class_policy(row.name)
    value = {
        "name": row.name,
        "last_version": row.last_version,
        "created_at": row.created_at,
        "profile": profile,
        "policy": policy.model_dump() if policy is not None else None,
    }
    rows = [{"field": k, "value": v} for k, v in profile.model_dump().items()]
    rows.append({"field": "last_version", "value": row.last_version})
    rows += [{"field": f"policy.{k}", "value": v} for k, v in (policy.model_dump() if policy else {}).items()]
    emit(rows, columns=["field", "value"], as_json=as_json, title=f"class {row.name}", json_value=value)
