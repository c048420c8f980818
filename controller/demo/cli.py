"""`edgefleet demo`: the command line of the end-to-end demo (see `edgefleet.controller.demo.run`)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from edgefleet.controller.cli.common import CliState, guarded
from edgefleet.controller.demo.models import CompressMode
from edgefleet.controller.demo.report import render_summary
from edgefleet.controller.demo.run import ALLOWED_FAILURES, Demo, DemoOptions, DemoSummary

__all__ = ["demo"]

INTERRUPTED = 130


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM and SIGINT stop the demo the way Ctrl-C does (everything it started is stopped on the way out).

    SIGINT gets Python's own handler back explicitly: a process started in the background by a non-interactive shell
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt, so Ctrl-C-style stops would be lost.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _root_flags(ctx: typer.Context) -> dict[str, Any]:
    state = ctx.find_root().obj
    return state.flags if isinstance(state, CliState) else {}


def _print_summary(summary: DemoSummary, console: Console) -> None:
    """The table and the story, then the verdict: computed per class from the numbers it shows."""
    console.print()
    console.print(render_summary(summary.classes, share=ALLOWED_FAILURES))
    console.print(f"broker: {summary.broker}, {summary.broker_auth}")
    timings = ", ".join(f"{k} {v:g}s" for k, v in summary.seconds.items())
    console.print(f"timings: {timings}")
    for problem in summary.problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
    colour = "green" if summary.ok else "red"
    for line in summary.verdict:
        console.print(f"[{colour}]{escape(line)}[/]")


def _planted(value: str, default: str, classes: tuple[str, ...]) -> str | None:
    """`none` -> None; `auto` -> `default` when the demo runs that class, else None; a class name as given."""
    if value.lower() == "none":
        return None
    if value.lower() == "auto":
        return default if default in classes else None
    return value


@guarded
def demo(  # noqa: PLR0917 - typer passes every option by position
    ctx: typer.Context,
    duration: Annotated[
        float, typer.Option("--duration", min=0, max=86400, help="seconds to run at the end, after the story")
    ] = 20.0,
    devices: Annotated[int, typer.Option("--devices", min=1, max=1000, help="simulated devices per class")] = 10,
    classes: Annotated[
        list[str] | None, typer.Option("--class", help="device class from deploy/profiles (repeatable)")
    ] = None,
    home: Annotated[
        Path | None, typer.Option("--home", help="edgefleet home to use and keep (default: temporary)")
    ] = None,
    keep_home: Annotated[bool, typer.Option("--keep-home", help="keep the temporary home afterwards")] = False,
    compress: Annotated[
        CompressMode,
        typer.Option("--compress", help="recipe (fixed, per class) or planner (recipe where nothing fits in time)"),
    ] = CompressMode.recipe,
    plan_budget: Annotated[float, typer.Option("--plan-budget", min=1, help="planner seconds per class")] = 30.0,
    train_epochs: Annotated[int, typer.Option("--train-epochs", min=1, max=100, help="digits training epochs")] = 4,
    slow_class: Annotated[
        str, typer.Option("--slow-class", help="class whose devices turn slow mid-run (auto: rpi4; none: no slowdown)")
    ] = "auto",
    slow_factor: Annotated[
        float, typer.Option("--slow-factor", min=1.5, max=10, help="how much slower than profiled the class turns")
    ] = 2.5,
    bad_class: Annotated[
        str,
        typer.Option("--bad-class", help="class given a bad second artifact (auto: x86-gateway; none: not planted)"),
    ] = "auto",
    telemetry_window: Annotated[
        float, typer.Option("--telemetry-window", min=1, max=60, help="seconds per report")
    ] = 2.0,
    rate: Annotated[float, typer.Option("--rate", min=0.5, max=50, help="inferences per second per device")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="progress on stderr, a JSON summary on stdout")] = False,
) -> None:
    """Run the whole product on this machine: broker, controller, simulated fleet, compress, gated rollouts in waves,
    a slow class recompressed from its telemetry, a bad artifact stopped at its canary, a summary per class.

    Its own Mosquitto checks per-device passwords and ACLs and refuses anonymous clients.

    Device passwords are kept in HOME/credentials/CLASS.csv (0600); a kept --home run again reuses them.

    With the global --mqtt-port it uses that broker as configured; devices connect to it anonymously (its business).
    """
    flags = _root_flags(ctx)
    broker = None
    if flags.get("mqtt_port") is not None:
        broker = (str(flags.get("mqtt_host") or "127.0.0.1"), int(flags["mqtt_port"]))
    chosen = tuple(classes) if classes else DemoOptions().classes
    options = DemoOptions(
        duration_s=duration,
        devices=devices,
        classes=chosen,
        home=home or flags.get("home"),
        keep_home=keep_home,
        broker=broker,
        compress=compress,
        plan_budget_s=plan_budget,
        train_epochs=train_epochs,
        telemetry_window_s=telemetry_window,
        rate_hz=rate,
        slow_class=_planted(slow_class, "rpi4", chosen),
        slow_factor=slow_factor,
        bad_class=_planted(bad_class, "x86-gateway", chosen),
    )
    console = Console(stderr=as_json)
    runner = Demo(options, console=console)
    try:
        with _sigterm_interrupts():
            summary = runner.run()
    except KeyboardInterrupt:
        console.print("interrupted: everything the demo started is stopped")
        raise typer.Exit(INTERRUPTED) from None
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=2, default=str))
    else:
        _print_summary(summary, console)
    if not summary.ok:
        raise typer.Exit(1)
