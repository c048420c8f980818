"""What the demo shows: progress bars per class, and per class the deployed version, devices active, p95 latency,
accuracy and telemetry.

Latency and accuracy come from the controller's Prometheus registry (the histogram merged exactly from the
agents' bucket counts, as the metrics endpoint serves it); devices and jobs from the registry database; telemetry
message counts from the rollups the service writes.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlmodel import col, func, select

from edgefleet.controller.db import Database
from edgefleet.controller.tables import DeploymentJob, Device, TelemetryRollup

__all__ = [
    "ClassReport",
    "ClassTarget",
    "Waiting",
    "class_report",
    "device_counts",
    "histogram_quantile",
    "render_table",
    "wait_with_bars",
]

LATENCY = "edgefleet_inference_latency_seconds"


@dataclass(frozen=True, slots=True)
class ClassTarget:
    """One class of the demo and what was deployed to it."""

    class_name: str
    model: str
    version: int
    artifact_bytes: int
    recipe: str
    source: str
    latency_budget_ms: float
    job_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClassReport:
    device_class: str
    model: str
    version: int
    recipe: str
    compressed_by: str
    artifact_bytes: int
    devices_total: int
    devices_online: int
    devices_active: int
    jobs: dict[str, int] = field(default_factory=dict)
    p95_latency_ms: float | None = None
    latency_budget_ms: float = 0.0
    accuracy: float | None = None
    labelled_samples: int = 0
    inferences: int = 0
    reported_inferences: int = 0
    telemetry_messages: int = 0
    bytes_served: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _latency_buckets(registry: CollectorRegistry, labels: dict[str, str]) -> list[tuple[float, float]]:
    found = []
    for family in registry.collect():
        if family.name != LATENCY:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append((float(sample.labels["le"]), float(sample.value)))
    return found


def device_counts(db: Database, class_name: str, version: int) -> tuple[int, int, int]:
    """Registered, online, and online on `version`, of one class."""
    with db.reading(f"counting devices of {class_name}") as session:
        rows = session.exec(select(Device.online, Device.model_version).where(Device.class_name == class_name)).all()
    total = len(rows)
    online = sum(1 for is_online, _ in rows if is_online)
    active = sum(1 for is_online, v in rows if is_online and v == version)
    return total, online, active


def _job_states(db: Database, job_ids: Sequence[str]) -> dict[str, int]:
    if not job_ids:
        return {}
    with db.reading("counting deploy jobs") as session:
        states = session.exec(select(DeploymentJob.state).where(col(DeploymentJob.id).in_(list(job_ids)))).all()
    return dict(Counter(states))


def _telemetry(db: Database, class_name: str, version: int) -> tuple[int, int]:
    with db.reading(f"summing telemetry of {class_name}") as session:
        row = session.exec(
            select(func.sum(TelemetryRollup.messages), func.sum(TelemetryRollup.inferences)).where(
                TelemetryRollup.class_name == class_name, TelemetryRollup.model_version == version
            )
        ).one()
    return int(row[0] or 0), int(row[1] or 0)


def class_report(target: ClassTarget, *, db: Database, registry: CollectorRegistry) -> ClassReport:
    """The current numbers of one class (cheap enough to call every second)."""
    labels = {"device_class": target.class_name, "model": target.model, "model_version": str(target.version)}
    p95 = histogram_quantile(0.95, _latency_buckets(registry, labels))
    counted = registry.get_sample_value(f"{LATENCY}_count", labels) or 0.0
    labelled = registry.get_sample_value("edgefleet_labelled_samples_total", labels) or 0.0
    correct = registry.get_sample_value("edgefleet_correct_predictions_total", labels) or 0.0
    served = registry.get_sample_value("edgefleet_artifact_bytes_served_total", {"device_class": target.class_name})
    total, online, active = device_counts(db, target.class_name, target.version)
    messages, inferences = _telemetry(db, target.class_name, target.version)
    return ClassReport(
        device_class=target.class_name,
        model=target.model,
        version=target.version,
        recipe=target.recipe,
        compressed_by=target.source,
        artifact_bytes=target.artifact_bytes,
        devices_total=total,
        devices_online=online,
        devices_active=active,
        jobs=_job_states(db, target.job_ids),
        p95_latency_ms=p95 * 1000.0 if p95 is not None else None,
        latency_budget_ms=target.latency_budget_ms,
        accuracy=correct / labelled if labelled else None,
        labelled_samples=int(labelled),
        inferences=int(counted),
        reported_inferences=inferences,
        telemetry_messages=messages,
        bytes_served=int(served or 0),
    )


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def render_table(report: ClassReport, *, title: str | None = None) -> Table:
    """One class as a two-column rich table."""
    table = Table(
        title=title or f"class {report.device_class}", title_justify="left", title_style="bold", show_header=False
    )
    table.add_column("", style="bold")
    table.add_column("")
    p95 = "-" if report.p95_latency_ms is None else f"{report.p95_latency_ms:.2f} ms"
    within = ""
    if report.p95_latency_ms is not None:
        within = " (within budget)" if report.p95_latency_ms <= report.latency_budget_ms else " (OVER budget)"
    accuracy = "-" if report.accuracy is None else f"{report.accuracy:.2%} of {report.labelled_samples} labelled"
    jobs = ", ".join(f"{state} {n}" for state, n in sorted(report.jobs.items())) or "-"
    rows = [
        ("model version", f"{report.model} v{report.version}"),
        ("compressed by", f"{report.compressed_by}: {report.recipe}"),
        ("artifact", f"{_kb(report.artifact_bytes)}, {_kb(report.bytes_served)} of blocks served"),
        ("devices active", f"{report.devices_active} / {report.devices_total} ({report.devices_online} online)"),
        ("deploy jobs", jobs),
        ("p95 latency", f"{p95} of {report.latency_budget_ms:g} ms budget{within}"),
        ("accuracy", accuracy),
        ("inferences", str(report.inferences)),
        ("telemetry messages", str(report.telemetry_messages)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


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
