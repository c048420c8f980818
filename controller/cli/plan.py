"""`edgefleet compress plan`: pick the recipe that fits a device profile; print the choice, why, and the Pareto front.

    edgefleet compress plan --example digits --profile deploy/profiles/rpi4.toml --out digits-rpi4.onnx
    edgefleet compress plan --model mypkg.models:build --data data.npz --profile p.toml --time-budget 300 --json
    edgefleet compress plan --onnx model.onnx --data data.npz --profile p.toml      # ONNX-level passes only

Exit code 0 when a recipe fits, 1 when nothing fits (the report still names the closest candidate and its misses)
or the input is bad (a message, never a traceback). torch is imported inside the command only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.controller.cli.common import fail
from edgefleet.controller.cli.sources import DataOpt, ExampleOpt, ModelOpt, OnnxOpt, load_model_source

if TYPE_CHECKING:
    from rich.console import Console
    from torch import nn

    from edgefleet.compression.plan_models import Candidate, PlanResult
    from edgefleet.compression.task import Task
    from edgefleet.protocols.profile import DeviceProfile

__all__ = ["default_cache_dir", "plan", "print_plan", "run_plan"]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/edgefleet/plan (~/.cache/edgefleet/plan)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgefleet" / "plan"


def _size(n: int | float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _checks_table(candidate: Candidate, title: str) -> object:
    from rich.table import Table

    table = Table(title=title)
    for column in ("constraint", "value", "budget", "slack", "fits", "how"):
        table.add_column(column)
    for check in candidate.checks:
        if check.unit == "bytes":
            value, budget, slack = _size(check.value), _size(check.budget), f"{check.slack:+.0%}"
        elif check.unit == "ms":
            value, budget, slack = f"{check.value:.2f} ms", f"{check.budget:.2f} ms", f"{check.slack:+.0%}"
        else:
            value, budget, slack = f"{check.value:.4f}", f"{check.budget:.4f}", f"{check.slack * 100:+.2f} pt"
        fits = "[green]yes[/]" if check.fits else "[red]no[/]"
        table.add_row(check.constraint.value, value, budget, slack, fits, check.detail)
    return table


def _front_table(result: PlanResult) -> object:
    from rich.table import Table

    table = Table(title="Pareto front (accuracy / bytes / predicted device p95)")
    for column in ("recipe", "accuracy", "bytes", "p95 ms", "peak RSS", "fits"):
        table.add_column(column)
    chosen = result.chosen.key if result.chosen is not None else None
    for c in result.front:
        missed = ", ".join(k.constraint.value for k in c.checks if not k.fits) or "incompatible"
        label = f"[bold]{c.label}[/] (chosen)" if c.key == chosen else c.label
        table.add_row(
            label, f"{c.measurement.accuracy:.4f}", _size(c.measurement.file_bytes), f"{c.predicted_latency_ms:.2f}",
            _size(c.measurement.peak_rss_bytes), "yes" if c.fits else f"no ({missed})",
        )  # fmt: skip
    return table


def _contributions_table(result: PlanResult) -> object:
    from rich.table import Table

    table = Table(title="what each pass contributed")
    for column in ("pass", "bytes", "predicted p95 ms", "accuracy"):
        table.add_column(column)
    for c in result.contributions:
        table.add_row(
            c.kind.value,
            f"{_size(c.bytes_before)} -> {_size(c.bytes_after)}",
            f"{c.latency_before_ms:.2f} -> {c.latency_after_ms:.2f}",
            f"{c.accuracy_before:.4f} -> {c.accuracy_after:.4f}",
        )
    return table


def print_plan(result: PlanResult, console: Console) -> None:
    profile = result.profile
    cache = f"cache {result.cache_hits} hits / {result.cache_misses} misses"
    console.print(
        f"[bold]{result.task}[/] on [bold]{profile.name}[/] (planned in {result.seconds:.0f} s, "
        f"{len(result.candidates)} candidates, {cache})"
    )
    if result.analysis is not None and result.analysis.violated:
        needs = ", ".join(f"{k.value} {v:.2f}x" for k, v in result.analysis.needs.items())
        console.print(f"fp32 violates: {', '.join(c.value for c in result.analysis.violated)} (needs {needs})")
    if result.chosen is not None:
        console.print(f"chosen recipe: [bold green]{result.chosen.label}[/]")
        console.print(f"binding constraint: [bold]{result.binding.value if result.binding else 'none'}[/]")
        console.print(_checks_table(result.chosen, "the chosen recipe against the profile"))
        if result.contributions:
            console.print(_contributions_table(result))
    elif result.closest is not None:
        console.print(f"[bold red]nothing fits[/]; closest candidate: [bold]{result.closest.label}[/]")
        for miss in result.misses:
            how = f"{miss.miss * 100:.2f} pt" if miss.unit == "accuracy" else f"{miss.miss:.0%} over budget"
            console.print(f"  misses {miss.constraint.value} by {how} ({miss.value:g} vs {miss.budget:g} {miss.unit})")
        console.print(_checks_table(result.closest, "the closest candidate against the profile"))
    else:
        console.print("[bold red]incompatible[/]: " + "; ".join(result.incompatible))
    if result.front:
        console.print(_front_table(result))
    for note in result.notes:
        console.print(f"note: {note}")
    if result.timed_out:
        console.print("note: the time budget ran out; this is the best fit measured so far")


def run_plan(
    the_model: nn.Module | bytes,
    task: Task,
    profile: DeviceProfile,
    time_budget: float | None,
    cache_dir: Path | None,
) -> PlanResult:
    """Plan with a progress bar on stderr (shared by `compress plan` and `compress class`)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgefleet.compression.plan_cache import PlanCache
    from edgefleet.compression.planner import PlanOptions
    from edgefleet.compression.planner import plan as make_plan

    options = PlanOptions(time_budget_s=time_budget)
    the_cache = PlanCache(cache_dir) if cache_dir is not None else None
    console = Console(stderr=True)
    if not console.is_terminal:  # a file or a pipe: a line per stage (a bar would vanish)
        last = [""]

        def line(done: int, total: int, what: str) -> None:
            if what != last[0]:
                last[0] = what
                typer.echo(f"{profile.name}: {what} ({done}/{total})", err=True)

        return make_plan(the_model, task, profile, options=options, cache=the_cache, progress=line)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        job = bar.add_task(f"planning for {profile.name}", total=1)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(job, completed=done, total=total, description=f"{profile.name}: {what}"[:70])

        return make_plan(the_model, task, profile, options=options, cache=the_cache, progress=progress)


def plan(
    *,
    profile: Annotated[Path, typer.Option(help="device profile TOML (see deploy/profiles)")],
    example: ExampleOpt = None,
    model: ModelOpt = None,
    onnx_file: OnnxOpt = None,
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="write the chosen ONNX model here")] = None,
    plot: Annotated[Path | None, typer.Option(help="write the Pareto front PNG here (default: next to --out)")] = None,
    time_budget: Annotated[
        float | None, typer.Option(min=1, help="seconds; return the best fit found when they run out")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="measured-candidate cache (default ~/.cache/edgefleet/plan)")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="do not read or write the cache")] = False,
    train_epochs: Annotated[int | None, typer.Option(min=1, max=1000, help="epochs to train the example")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the plan as JSON instead of tables")] = False,
) -> None:
    """Plan the compression recipe that keeps the most accuracy while fitting a device profile."""
    sources = [s for s in (example, model, onnx_file) if s is not None]
    if len(sources) != 1:
        raise typer.BadParameter("give exactly one of --example, --model, --onnx", param_hint="--example")
    from rich.console import Console

    from edgefleet.compression import CompressionError, write_atomic
    from edgefleet.compression.plan_pareto import write_front_plot
    from edgefleet.protocols.errors import ProtocolError
    from edgefleet.protocols.profile import load_profile

    try:
        device_profile = load_profile(profile)  # bad profiles fail before any training
        the_model, task = load_model_source(example, model, onnx_file, data, train_epochs)
        result = run_plan(
            the_model, task, device_profile, time_budget, None if no_cache else cache_dir or default_cache_dir()
        )
        if result.artifact is not None and out is not None:
            write_atomic(out, result.artifact)
        plot_path = plot or (out.with_name(out.name.removesuffix(".onnx") + ".front.png") if out else None)
        if plot_path is not None and result.candidates:
            write_front_plot(result, plot_path)
    except (ProtocolError, CompressionError) as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        raise fail(f"cannot write output: {exc}") from exc
    if json_output:
        typer.echo(result.model_dump_json(indent=2))
    else:
        console = Console()
        print_plan(result, console)
        if result.artifact is not None and out is not None:
            console.print(f"wrote {out} ({len(result.artifact)} bytes)")
        if plot_path is not None and result.candidates:
            console.print(f"wrote {plot_path}")
    if not result.feasible:
        raise typer.Exit(1)
