"""`edgefleet recompress policy|list|show|approve|reject`: the recompression loop's proposals and decisions.

The controller detects the triggers and builds the new artifacts; these verbs set a class's policy, show what was
proposed and why, and approve (which starts a gated rollout of the new artifact) or reject it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.controller.cli.common import JsonOpt, emit, guarded, open_registry
from edgefleet.controller.data.tables import Recompression
from edgefleet.controller.recompress.loop import RecompressionLoop
from edgefleet.controller.recompress.policy import load_policy

__all__ = ["recompress_app"]

recompress_app = typer.Typer(
    help="Recompressions triggered by field telemetry: policy, list, approve, reject.", no_args_is_help=True
)

COLUMNS = ["id", "class", "model", "trigger", "state", "artifact", "rollout", "summary", "created_at"]


def _loop(ctx: typer.Context) -> RecompressionLoop:
    registry = open_registry(ctx)
    return RecompressionLoop(registry.db, actor=registry.actor)


def _row(r: Recompression) -> dict[str, Any]:
    return {
        "id": r.id,
        "class": r.class_name,
        "model": r.model_name,
        "trigger": r.trigger,
        "state": r.state,
        "mode": r.mode,
        "artifact": r.artifact_id,
        "rollout": r.rollout_id,
        "summary": r.summary,
        "evidence": json.loads(r.evidence_json or "{}"),
        "report": json.loads(r.report_json or "{}"),
        "note": r.note,
        "decided_by": r.decided_by,
        "created_at": r.created_at,
        "finished_at": r.finished_at,
    }


@recompress_app.command("policy")
@guarded
def policy(
    ctx: typer.Context,
    class_name: Annotated[str, typer.Argument(help="device class")],
    file: Annotated[Path, typer.Option("--file", help="the class TOML holding a [policy] table")],
    as_json: JsonOpt = False,
) -> None:
    """Set the class's recompression policy from the `policy` table of its TOML."""
    loaded = load_policy(file)
    _loop(ctx).set_policy(class_name, loaded)
    if as_json:
        typer.echo(json.dumps({"class": class_name, "policy": loaded.model_dump()}, sort_keys=True))
        return
    typer.echo(f"class {class_name}: recompression policy set (mode {loaded.mode})")


@recompress_app.command("list")
@guarded
def list_recompressions(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List recompressions, newest first."""
    emit([_row(r) for r in _loop(ctx).list()], columns=COLUMNS, as_json=as_json, title="recompressions")


@recompress_app.command("show")
@guarded
def show(
    ctx: typer.Context,
    recompression_id: Annotated[int, typer.Argument(help="recompression id")],
    as_json: JsonOpt = False,
) -> None:
    """One recompression: the trigger's evidence and the new artifact's report."""
    row = _row(_loop(ctx).get(recompression_id))
    if as_json:
        typer.echo(json.dumps(row, default=str, indent=2, sort_keys=True))
        return
    for key, value in row.items():
        typer.echo(f"{key:>11}  {json.dumps(value, default=str) if isinstance(value, dict) else value}")


@recompress_app.command("approve")
@guarded
def approve(
    ctx: typer.Context,
    recompression_id: Annotated[int, typer.Argument(help="recompression id")],
    as_json: JsonOpt = False,
) -> None:
    """Approve: a gated rollout of the new artifact starts (aborted with rollback on a breach)."""
    row = _loop(ctx).approve(recompression_id)
    if as_json:
        typer.echo(json.dumps({"id": row.id, "state": row.state, "rollout": row.rollout_id}, sort_keys=True))
        return
    typer.echo(f"recompression {row.id} approved: rollout {row.rollout_id} of artifact {row.artifact_id} started")


@recompress_app.command("reject")
@guarded
def reject(
    ctx: typer.Context,
    recompression_id: Annotated[int, typer.Argument(help="recompression id")],
    reason: Annotated[str, typer.Option("--reason", help="why (kept in the audit log)")] = "rejected by operator",
    as_json: JsonOpt = False,
) -> None:
    """Reject the proposal; the class keeps its current model."""
    row = _loop(ctx).reject(recompression_id, reason=reason)
    if as_json:
        typer.echo(json.dumps({"id": row.id, "state": row.state}, sort_keys=True))
        return
    typer.echo(f"recompression {row.id} rejected")
