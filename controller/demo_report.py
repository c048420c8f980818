"""What the demo shows: progress bars per class, the live fleet table (models running, recent p95 against the
budget, accuracy, what is happening), and at the end a summary per class: its versions and where their rollouts
ended, the model it runs, p95 against budget, accuracy, and the story of what happened to it.

The numbers are the controller's: devices from the registry database, latency and accuracy from the telemetry
rollups (latency bucket counts added up exactly, the p95 interpolated as Prometheus' `histogram_quantile` does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = [
    "ClassStory",
    "OverviewRow",
    "VersionStory",
    "Waiting",
    "histogram_quantile",
    "render_overview",
    "render_summary",
    "wait_with_bars",
]

LATENCY = "edgefleet_inference_latency_seconds"


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile` on cumulative (upper bound, count) pairs: linear within the bucket."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width > 0 else 1.0)
        lower, below = bound, count
    return lower


@dataclass(frozen=True, slots=True)
class Waiting:
    """One class's bar while waiting: `count` of `total`, a detail line, and whether the wait is over."""

    count: int
    total: int
    detail: str
    done: bool


def wait_with_bars(
    console: Console,
    title: str,
    poll: Callable[[], dict[str, Waiting]],
    *,
    classes: Sequence[str],
    timeout: float,
    check: Callable[[], None],
    interval: float = 0.5,
) -> bool:
    """Show a bar per class, polling until every class is done (True) or `timeout` passes (False)."""
    began = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        bars = {c: progress.add_task(f"{title} {c}", total=None, detail="") for c in classes}
        while True:
            check()
            state = poll()
            for c, w in state.items():
                progress.update(bars[c], completed=w.count, total=w.total, detail=w.detail)
            if all(w.done for w in state.values()):
                return True
            if time.monotonic() - began > timeout:
                return False
            time.sleep(interval)


# ---------------------------------------------------------------------------------------------------- the whole story
@dataclass(slots=True)
class VersionStory:
    """One artifact the demo made for a class, and where its rollout ended."""

    version: int
    recipe: str
    made_by: str  # "compression", "recompression", "planted bad artifact"
    accuracy_measured: float | None
    artifact_bytes: int
    rollout_id: int | None = None
    rollout_state: str = ""
    rollout_devices: dict[str, int] = field(default_factory=dict)
    waves_opened: int = 0


@dataclass(slots=True)
class ClassStory:
    """A class through the demo: its versions, what happened, and its numbers at the end."""

    device_class: str
    latency_budget_ms: float
    device_over_host: float  # fp32 path, this host's reference times against the profile's
    versions: list[VersionStory] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    current_version: int | None = None
    devices_total: int = 0
    devices_online: int = 0
    devices_on_current: int = 0
    p95_latency_ms: float | None = None  # the current version, over the last seconds
    accuracy: float | None = None  # the current version, over the last seconds
    labelled_samples: int = 0
    within_budget: bool | None = None
    recompressions: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


_MADE_BY = {"recompression": "recompressed ", "planted bad artifact": "planted "}


def _version_line(v: VersionStory) -> str:
    head = f"v{v.version} {_MADE_BY.get(v.made_by, '')}{v.recipe}"
    if v.rollout_id is None:
        return f"{head}: not rolled out"
    devices = ", ".join(f"{s.replace('_', ' ')} {n}" for s, n in v.rollout_devices.items()) or "no devices"
    return f"{head}: {v.rollout_state} ({devices})"


def render_summary(stories: Sequence[ClassStory]) -> Group:
    """The final table (one row per class), then each class's story, one line per event."""
    table = Table(title="edgefleet demo: classes at the end", title_justify="left", title_style="bold", show_lines=True)
    for name in ("class", "versions and their rollouts", "running", "p95 / budget", "accuracy"):
        table.add_column(name, overflow="fold")
    for s in stories:
        verdict = {True: "[green]ok[/]", False: "[red]OVER[/]", None: ""}[s.within_budget]
        p95 = "-" if s.p95_latency_ms is None else f"{s.p95_latency_ms:.2f}"
        table.add_row(
            s.device_class,
            "\n".join(_version_line(v) for v in s.versions) or "-",
            f"v{s.current_version} {s.devices_on_current}/{s.devices_total}" if s.current_version else "-",
            f"{p95} / {s.latency_budget_ms:g} ms {verdict}",
            _pct(s.accuracy),
        )
    lines: list[str] = []
    for s in stories:
        lines.append(f"[bold]{s.device_class}[/]")
        lines.extend(f"  {event}" for event in s.events)
    return Group(table, "what happened:", *lines)


@dataclass(frozen=True, slots=True)
class OverviewRow:
    """One class in the live view."""

    device_class: str
    versions: dict[int | None, int]  # model version -> online devices running it
    online: int
    total: int
    p95_ms: float | None
    budget_ms: float
    accuracy: float | None
    note: str


def render_overview(rows: Sequence[OverviewRow]) -> Table:
    table = Table(title="fleet", title_justify="left", title_style="bold")
    for name in ("class", "online", "models running", "p95 (last 12 s)", "accuracy", "now"):
        table.add_column(name)
    for r in rows:
        models = ", ".join(f"v{v} x{n}" if v is not None else f"none x{n}" for v, n in sorted(
            r.versions.items(), key=lambda kv: kv[0] or 0)) or "-"  # fmt: skip
        p95 = _ms(r.p95_ms)
        if r.p95_ms is not None:
            p95 = f"[green]{p95}[/]" if r.p95_ms <= r.budget_ms else f"[red]{p95}[/]"
        table.add_row(
            r.device_class, f"{r.online}/{r.total}", models, f"{p95} of {r.budget_ms:g}", _pct(r.accuracy), r.note
        )
    return table
