"""The Pareto front of measured candidates (accuracy up, bytes down, predicted device latency down): table and plot.

The plot uses matplotlib's object API with the Agg canvas, so it never touches a display or pyplot's global state.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.compression.plan_models import Candidate, PlanResult
from edgefleet.compression.sources import write_atomic

__all__ = ["front_table", "pareto_front", "plot_front", "write_front_plot"]


def _dominates(a: Candidate, b: Candidate) -> bool:
    ma, mb = a.measurement, b.measurement
    no_worse = (
        ma.accuracy >= mb.accuracy
        and ma.file_bytes <= mb.file_bytes
        and a.predicted_latency_ms <= b.predicted_latency_ms
    )
    better = (
        ma.accuracy > mb.accuracy or ma.file_bytes < mb.file_bytes or a.predicted_latency_ms < b.predicted_latency_ms
    )
    return no_worse and better


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The compatible candidates no other compatible candidate beats on all three objectives, most accurate first."""
    usable = [c for c in candidates if not c.incompatible]
    front = [c for c in usable if not any(_dominates(o, c) for o in usable if o is not c)]
    return sorted(front, key=lambda c: (-c.measurement.accuracy, c.measurement.file_bytes))


def front_table(result: PlanResult) -> str:
    """The front as a markdown table; the chosen recipe is marked."""
    lines = [
        "| recipe | accuracy | bytes | predicted p95 ms | peak RSS MB | fits | |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    chosen = result.chosen.key if result.chosen is not None else None
    for c in result.front:
        m = c.measurement
        rss = f"{m.peak_rss_bytes / 1e6:.1f}" if m.peak_rss_bytes is not None else "-"
        missed = ", ".join(k.constraint.value for k in c.checks if not k.fits)
        fits = "yes" if c.fits else f"no ({missed or 'incompatible'})"
        mark = "chosen" if c.key == chosen else ""
        latency = f"{c.predicted_latency_ms:.2f}"
        lines.append(f"| {c.label} | {m.accuracy:.4f} | {m.file_bytes} | {latency} | {rss} | {fits} | {mark} |")
    return "\n".join(lines)


def _file_bytes(candidate: Candidate) -> float:
    return float(candidate.measurement.file_bytes)


def _latency(candidate: Candidate) -> float:
    return candidate.predicted_latency_ms


def _tick(value: float, _position: object) -> str:
    return f"{value / 1e3:g}k" if value >= 1e4 else f"{value:g}"


def _front_2d(front: list[Candidate], x_of: Callable[[Candidate], float]) -> list[Candidate]:
    """The accuracy-versus-x staircase: candidates more accurate than every cheaper one."""
    out: list[Candidate] = []
    for candidate in sorted(front, key=lambda c: (x_of(c), -c.measurement.accuracy)):
        if not out or candidate.measurement.accuracy > out[-1].measurement.accuracy:
            out.append(candidate)
    return out


def plot_front(result: PlanResult) -> bytes:
    """A PNG: accuracy against file bytes and against predicted device p95, budgets as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    size_ax, latency_ax = figure.subplots(1, 2, sharey=True)
    profile = result.profile
    front_keys = {c.key for c in result.front}
    panels: list[tuple[Any, Callable[[Candidate], float], float, str]] = [
        (size_ax, _file_bytes, profile.storage_budget_bytes, "file bytes (log)"),
        (latency_ax, _latency, profile.latency_budget_ms, "predicted device p95 ms (log)"),
    ]
    for ax, x_of, budget, label in panels:
        others = [c for c in result.candidates if c.key not in front_keys]
        ax.scatter([x_of(c) for c in others], [c.measurement.accuracy for c in others], s=14, c="0.7", label="measured")
        ax.scatter([x_of(c) for c in result.front], [c.measurement.accuracy for c in result.front], s=22,
                   c="tab:blue", label="Pareto front (3 objectives)")  # fmt: skip
        steps = _front_2d(result.front, x_of)
        ax.step([x_of(c) for c in steps], [c.measurement.accuracy for c in steps], where="post", c="tab:blue")
        if result.chosen is not None:
            ax.scatter([x_of(result.chosen)], [result.chosen.measurement.accuracy], s=160, marker="*", c="tab:red",
                       zorder=5, label="chosen")  # fmt: skip
        ax.axvline(budget, ls="--", c="tab:orange", label="budget")
        required = [k.budget for k in (result.fp32.checks if result.fp32 else []) if k.constraint == "accuracy"]
        if required:
            ax.axhline(required[0], ls=":", c="tab:green", label="required accuracy")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_tick))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.grid(visible=True, alpha=0.3)
    size_ax.set_ylabel("held-out accuracy")
    size_ax.legend(loc="lower right", fontsize=8)
    figure.suptitle(f"{result.task} on {profile.name}: Pareto front")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_front_plot(result: PlanResult, path: Path | str) -> Path:
    """Write the front plot as a PNG file (atomically) and return its path."""
    path = Path(path)
    write_atomic(path, plot_front(result))
    return path
