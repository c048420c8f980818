"""A plan's pick becomes a class's next signed artifact: one path for `edgefleet compress class` and for the
recompression worker, so both record the same recipe shape (the list of passes) and the same metrics.

The metrics are what the gates and the recompression triggers compare the field with later: `accuracy` and
`predicted_p95_ms` (host p95 at one thread x device/host on the reference workload, compression/plan_latency.py),
plus sizes and host latencies. The task's validation split (`validation_of(task)`) gives the manifest its validation
samples, so a planned artifact is always checked on the devices before they switch to it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.validation_set import ValidationSet
from edgefleet.controller.data.tables import Artifact
from edgefleet.controller.errors import NothingFitsError

if TYPE_CHECKING:
    from edgefleet.compression.plan_models import Candidate, PlanResult

__all__ = ["plan_metrics", "store_planned", "validation_of"]


def plan_metrics(chosen: Candidate) -> dict[str, float]:
    """The chosen candidate's measurements, as the manifest's `metrics` (numbers only)."""
    m = chosen.measurement
    values = {
        "accuracy": m.accuracy,
        "predicted_p95_ms": chosen.predicted_latency_ms,
        "file_bytes": m.file_bytes,
        "transfer_bytes": m.transfer_bytes,
        "parameters": m.parameters,
        "host_latency_p50_ms": m.latency_p50_ms,
        "host_latency_p95_ms": m.latency_p95_ms,
        "peak_rss_bytes": m.peak_rss_bytes,
        "size_ratio": m.size_ratio,
        "accuracy_delta": m.accuracy_delta,
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def validation_of(task: Any) -> ValidationSet:
    """The validation split of an `edgefleet.compression.Task` (`x_val`, `y_val`), for the manifest's samples."""
    return ValidationSet.from_arrays(task.x_val, task.y_val)


def nothing_fits_message(result: PlanResult, class_name: str) -> str:
    if result.closest is None:
        return f"no recipe can run on class {class_name}: " + "; ".join(result.incompatible or ["incompatible"])
    misses = ", ".join(f"{m.constraint.value} {m.value:g} vs {m.budget:g} {m.unit}" for m in result.misses)
    return f"nothing fits class {class_name}; closest: {result.closest.label} ({misses}); nothing was stored"


def store_planned(
    catalog: ArtifactCatalog,
    result: PlanResult,
    *,
    model_name: str,
    class_name: str,
    validation: ValidationSet | None,
    workdir: Path | None = None,
) -> Artifact:
    """Sign and store the plan's pick as the class's next artifact; `NothingFitsError` when there is none.

    `validation` (usually `validation_of(task)`) gives the manifest its samples; None only where there is no data.
    """
    chosen = result.chosen
    if not result.feasible or chosen is None or result.artifact is None:
        raise NothingFitsError(nothing_fits_message(result, class_name))
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-plan-", dir=workdir) as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(result.artifact)
        return catalog.add_from_onnx(
            model_name,
            class_name=class_name,
            onnx_path=path,
            recipe=tuple(p.model_dump(mode="json") for p in chosen.recipe.passes),
            metrics=plan_metrics(chosen),
            validation=validation,
        )
