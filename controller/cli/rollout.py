"""`edgefleet rollout start|status|list|pause|resume|abort`: gated rollouts from the command line.

These verbs change the registry only; the serving controller's rollout engine sends the commands on its next step.
`status --watch` redraws a live view (waves with progress bars, devices per state, gates against thresholds) on a
terminal, and prints a line whenever something changes when its output goes to a file or a pipe; it returns when
nothing is left to wait for (the rollout ended, or it is paused with no device in flight) or on Ctrl-C.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from edgefleet.controller.cli.common import JsonOpt, emit, guarded, open_registry, to_jsonable
from edgefleet.controller.data.states import FINAL_ROLLOUT_STATES, FINAL_ROW_STATES, RolloutState
from edgefleet.controller.errors import ConfigError
from edgefleet.controller.rollout.api import Rollouts
from edgefleet.controller.rollout.plan import GateConfig, Selector, WavePlan, parse_canary
from edgefleet.controller.rollout.status import describe, summary_row
from edgefleet.protocols.errors import describe_problems

__all__ = ["rollout_app"]

rollout_app = typer.Typer(help="Roll an artifact out in waves, gated on the model's health.", no_args_is_help=True)

_GOOD = {"active"}  # a rolled-back device is not on the rollout's model: it shows under "other"
# `rollout status` exits with the outcome: 0 completed (or, without --watch, still under way), 3 aborted,
# 4 paused (waiting for `rollout resume` or `abort`).
EXIT_ABORTED = 3
EXIT_PAUSED = 4
_BAD = {"failed", "timed_out", "rollback_failed"}


class BreachAction(StrEnum):
    PAUSE = "pause"
    ABORT = "abort"


def _canary(value: str) -> str:
    try:
        parse_canary(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return value


def _rollouts(ctx: typer.Context) -> Rollouts:
    registry = open_registry(ctx)
    return Rollouts(registry.db, actor=registry.actor)


def _validated(kind: str, build: Any) -> Any:
    try:
        return build()
    except ValidationError as exc:
        raise ConfigError(f"{kind}: {describe_problems(exc, subject=kind)}") from exc


@rollout_app.command("start")
@guarded
def start(  # noqa: PLR0917 - typer passes options by position
    ctx: typer.Context,
    artifact: Annotated[str, typer.Argument(help="artifact id, or class:version")],
    class_name: Annotated[str | None, typer.Option("--class", help="the artifact's class (checked)")] = None,
    canary: Annotated[str, typer.Option("--canary", help="first wave: N devices or P%", callback=_canary)] = "5%",
    growth: Annotated[float, typer.Option("--growth", min=1.0, max=100.0, help="each wave = previous x this")] = 2.0,
    max_concurrent: Annotated[int, typer.Option("--max-concurrent", min=1, help="downloads at once")] = 50,
    on_breach: Annotated[
        BreachAction, typer.Option("--on-breach", help="what a gate breach does")
    ] = BreachAction.PAUSE,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="seconds a device may stay silent")] = 900.0,
    window: Annotated[float, typer.Option("--window", min=1.0, help="gate window, seconds")] = 300.0,
    min_devices: Annotated[int, typer.Option("--min-devices", min=1, help="devices a gate needs")] = 3,
    min_samples: Annotated[int, typer.Option("--min-samples", min=1, help="inferences a gate needs")] = 100,
    min_labelled: Annotated[int, typer.Option("--min-labelled", min=1, help="labelled samples for accuracy")] = 50,
    max_error_rate: Annotated[float, typer.Option("--max-error-rate", min=0.0, max=1.0)] = 0.02,
    max_failure_rate: Annotated[float, typer.Option("--max-failure-rate", min=0.0, max=1.0)] = 0.2,
    latency_ms: Annotated[float | None, typer.Option("--latency-budget-ms", help="p95 ceiling (class budget)")] = None,
    accuracy_floor: Annotated[float | None, typer.Option("--accuracy-floor", help="floor (default: class)")] = None,
    device: Annotated[list[str] | None, typer.Option("--device", help="only these devices (repeatable)")] = None,
    id_prefix: Annotated[str | None, typer.Option("--id-prefix", help="only devices whose id starts so")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a rollout of ARTIFACT to its class; the controller runs it (see `rollout status --watch`)."""
    plan = _validated(
        "wave plan",
        lambda: WavePlan(canary=canary, growth=growth, max_concurrent=max_concurrent, device_timeout_s=timeout),
    )
    gates = _validated(
        "gates",
        lambda: GateConfig(
            window_s=window,
            min_devices=min_devices,
            min_samples=min_samples,
            min_labelled=min_labelled,
            max_error_rate=max_error_rate,
            max_failure_rate=max_failure_rate,
            latency_p95_ms=latency_ms,
            accuracy_floor=accuracy_floor,
        ),
    )
    selector = Selector(device_ids=tuple(device or ()), id_prefix=id_prefix)
    rollouts = _rollouts(ctx)
    rollout = rollouts.start(
        artifact, class_name=class_name, plan=plan, gates=gates, on_breach=on_breach.value, selector=selector
    )
    assert rollout.id is not None  # noqa: S101 - just inserted
    view = describe(rollouts.db, rollout.id)
    if as_json:
        typer.echo(json.dumps(view, indent=2, sort_keys=True))
        return
    sizes = ", ".join(str(w["planned"]) for w in view["waves"])
    typer.echo(
        f"rollout {rollout.id}: {view['model']} v{view['version']} to class {view['class']}, "
        f"{view['targets']} device(s) in waves of {sizes}; on breach: {rollout.on_breach}"
    )
    typer.echo(
        f"the controller starts it on its next step; watch it with `edgefleet rollout status {rollout.id} --watch`"
    )


@rollout_app.command("list")
@guarded
def list_rollouts(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List rollouts, newest first."""
    rows = [summary_row(r, a) for r, a in _rollouts(ctx).list()]
    columns = ["id", "state", "class", "artifact", "wave", "waves", "on_breach", "created_at", "finished_at"]
    emit(rows, columns=columns, as_json=as_json, title="rollouts")


@rollout_app.command("status")
@guarded
def status(
    ctx: typer.Context,
    rollout_id: Annotated[int | None, typer.Argument(help="rollout id (default: the latest)")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="redraw until the rollout ends (Ctrl-C stops)")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="seconds between redraws")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Show a rollout: waves, devices per state, gates against thresholds (`--watch`: live)."""
    rollouts = _rollouts(ctx)
    rid = rollout_id if rollout_id is not None else rollouts.latest_id()
    view = describe(rollouts.db, rid)
    if watch:
        try:
            view = _watch(rollouts, rid, interval=interval, as_json=as_json)
        except KeyboardInterrupt:
            return
    elif as_json:
        typer.echo(json.dumps(view, indent=2, sort_keys=True))
    else:
        Console().print(render(view))
    if view["state"] == RolloutState.ABORTED:
        raise typer.Exit(EXIT_ABORTED)
    if view["state"] == RolloutState.PAUSED:
        if watch and not as_json:
            typer.echo(f"paused: `edgefleet rollout resume {rid}` goes on, `edgefleet rollout abort {rid}` stops it")
        raise typer.Exit(EXIT_PAUSED)


def _settled(view: dict[str, Any]) -> bool:
    """Nothing left to wait for: the rollout ended, or it is paused (an operator decides) with no device in flight."""
    if view["unfinished_devices"]:
        return False
    return view["state"] in FINAL_ROLLOUT_STATES or view["state"] == RolloutState.PAUSED


def _watch(rollouts: Rollouts, rid: int, *, interval: float, as_json: bool) -> dict[str, Any]:
    """Redraw until nothing is left to wait for (see `_settled`); the last view."""
    view = describe(rollouts.db, rid)
    if as_json:  # one JSON document per line
        while True:
            typer.echo(json.dumps(to_jsonable(view), sort_keys=True))
            if _settled(view):
                return view
            time.sleep(interval)
            view = describe(rollouts.db, rid)
    console = Console()
    if not console.is_terminal:  # a file or a pipe: a line per change, then the full view once
        last = ""
        while True:
            line = status_line(view)
            if line != last:
                typer.echo(f"{time.strftime('%H:%M:%S')} {line}")
                last = line
            if _settled(view):
                console.print(render(view))
                return view
            time.sleep(interval)
            view = describe(rollouts.db, rid)
    with Live(render(view), console=console, refresh_per_second=4, transient=False) as live:
        while not _settled(view):
            time.sleep(interval)
            view = describe(rollouts.db, rid)
            live.update(render(view))
    return view


def status_line(view: dict[str, Any]) -> str:
    """The view in one line: state, wave, devices per state, each gate (what a log or a pipe gets)."""
    wave = max(view["current_wave"], 0) + 1
    totals = ", ".join(f"{state} {n}" for state, n in view["totals"].items()) or "no device yet"
    gates = "; ".join(
        f"{g['name']} {g['status']}"
        + (f" {_gate_number(g['name'], g['value'])}" if g["value"] is not None else "")
        + (f" vs {_gate_number(g['name'], g['threshold'])}" if g["threshold"] is not None else "")
        + (f" ({g['detail']})" if g["detail"] else "")
        for g in view["gates"]
    )
    line = (
        f"rollout {view['id']} {view['state']}, wave {wave}/{view['wave_count']}, {view['targets']} target(s): {totals}"
    )
    return f"{line}; gates: {gates}" if gates else line


def render(view: dict[str, Any]) -> RenderableType:
    """The status view: a header, the waves with progress bars, the gates."""
    head = (
        f"[bold]rollout {view['id']}[/bold]  {view['model']} v{view['version']} -> class {view['class']}  "
        f"state [bold]{view['state']}[/bold]  wave {max(view['current_wave'], 0) + 1}/{view['wave_count']}  "
        f"on breach: {view['on_breach']}"
    )
    waves = Table(title="waves", expand=False)
    for name in ("wave", "planned", "devices", "progress", "active", "in flight", "failed", "other"):
        waves.add_column(name)
    for wave in view["waves"]:
        states: dict[str, int] = wave["states"]
        total = wave["devices"] or wave["planned"] or 0
        done = sum(n for s, n in states.items() if s in FINAL_ROW_STATES)
        waves.add_row(
            wave["label"],
            str(wave["planned"] if wave["planned"] is not None else "-"),
            str(wave["devices"]),
            ProgressBar(total=max(total, 1), completed=done, width=24),
            str(sum(n for s, n in states.items() if s in _GOOD)),
            str(states.get("in_progress", 0) + states.get("pending", 0) + states.get("rolling_back", 0)),
            str(sum(n for s, n in states.items() if s in _BAD)),
            ", ".join(f"{s} {n}" for s, n in states.items() if s not in {*_GOOD, *_BAD, "in_progress", "pending"}),
        )
    gates = Table(title="gates")
    for name in ("gate", "status", "value", "threshold", "devices", "samples", "note"):
        gates.add_column(name)
    for gate in view["gates"]:
        colour = {"pass": "green", "breach": "red", "waiting": "yellow"}.get(gate["status"], "white")
        gates.add_row(
            gate["name"],
            f"[{colour}]{gate['status']}[/{colour}]",
            _gate_number(gate["name"], gate["value"]),
            _gate_number(gate["name"], gate["threshold"]),
            str(gate["devices"]),
            str(gate["samples"]),
            gate["detail"],
        )
    parts: list[RenderableType] = [head, waves]
    parts.append(gates if view["gates"] else "(gates are judged once the canary is out)")
    if view["breach"]:
        parts.append(_breach_line(view["breach"]))
    parts.extend(f"{n['device']} ({n['state']}): {n['detail']}" for n in view.get("device_notes", []))
    if view["accuracy_floor_source"]:
        parts.append(f"accuracy floor: {view['accuracy_floor_source']}")
    return Group(*parts)


def _breach_line(breach: dict[str, Any]) -> str:
    if "gates" not in breach:  # stopped by an operator
        return f"[yellow]stopped by {breach.get('by', '?')}:[/yellow] {breach.get('reason', '')}"
    gates = ", ".join(
        f"{g['name']} {_gate_number(g['name'], g['value'])} vs {_gate_number(g['name'], g['threshold'])} "
        f"({g['detail'] or 'judged'})"
        for g in breach["gates"]
    )
    return f"[red]breach in wave {breach.get('wave')}:[/red] {gates}; action: {breach.get('action')}"


def _gate_number(gate: str, value: Any) -> str:
    """A gate's value as an operator reads it: latency in ms (the gates judge seconds), the rest as they are."""
    if gate == "latency_p95" and isinstance(value, int | float):
        return f"{value * 1000:.3g} ms"
    return _number(value)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


@rollout_app.command("pause")
@guarded
def pause(
    ctx: typer.Context,
    rollout_id: Annotated[int, typer.Argument(help="rollout id")],
    reason: Annotated[str, typer.Option("--reason", help="why (audit log)")] = "operator",
    as_json: JsonOpt = False,
) -> None:
    """Stop opening new waves; devices already in flight finish."""
    rollout = _rollouts(ctx).pause(rollout_id, reason=reason)
    _said(as_json, {"id": rollout.id, "state": rollout.state}, f"rollout {rollout.id} paused")


@rollout_app.command("resume")
@guarded
def resume(
    ctx: typer.Context,
    rollout_id: Annotated[int, typer.Argument(help="rollout id")],
    waive: Annotated[list[str] | None, typer.Option("--waive", help="a gate that no longer stops it")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Resume a paused rollout; gates judge fresh telemetry from now on."""
    rollout = _rollouts(ctx).resume(rollout_id, waive=waive or ())
    _said(as_json, {"id": rollout.id, "state": rollout.state, "waived": waive or []}, f"rollout {rollout.id} resumed")


@rollout_app.command("abort")
@guarded
def abort(
    ctx: typer.Context,
    rollout_id: Annotated[int, typer.Argument(help="rollout id")],
    reason: Annotated[str, typer.Option("--reason", help="why (audit log)")] = "operator",
    as_json: JsonOpt = False,
) -> None:
    """Abort: unsent devices are cancelled, updated ones are rolled back by the controller."""
    rollout, rollbacks = _rollouts(ctx).abort(rollout_id, reason=reason)
    _said(
        as_json,
        {"id": rollout.id, "state": rollout.state, "rollbacks": rollbacks},
        f"rollout {rollout.id} aborted; {rollbacks} device(s) to roll back",
    )


def _said(as_json: bool, value: dict[str, Any], text: str) -> None:
    typer.echo(json.dumps(value, sort_keys=True) if as_json else text)
