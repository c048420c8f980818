"""Read-only views the CLI shows: one device with its jobs and latest telemetry, artifact summaries."""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import col, select

from edgefleet.controller.registry import Registry
from edgefleet.controller.tables import DeploymentJob, TelemetryRollup

__all__ = ["device_detail", "job_row"]


def job_row(job: DeploymentJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "device_id": job.device_id,
        "artifact_id": job.artifact_id,
        "state": job.state,
        "result_code": job.result_code,
        "detail": job.detail,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
    }


def device_detail(registry: Registry, device_id: str, *, jobs: int = 5) -> dict[str, Any]:
    """Everything `device show` prints about one device."""
    device = registry.get_device(device_id)
    with registry.db.reading(f"reading device {device_id!r}") as session:
        recent = session.exec(
            select(DeploymentJob)
            .where(DeploymentJob.device_id == device_id)
            .order_by(col(DeploymentJob.created_at).desc())
            .limit(jobs)
        ).all()
        rollup = session.exec(
            select(TelemetryRollup)
            .where(TelemetryRollup.device_id == device_id)
            .order_by(col(TelemetryRollup.window_start).desc())
            .limit(1)
        ).first()
    try:
        slot_state: Any = json.loads(device.slot_state) if device.slot_state else None
    except ValueError:
        slot_state = device.slot_state
    detail: dict[str, Any] = {
        "id": device.id,
        "class": device.class_name,
        "fleet": device.fleet,
        "state": "online" if device.online else "offline",
        "model_digest": device.model_digest,
        "model_version": device.model_version,
        "slot_state": json.dumps(slot_state, sort_keys=True) if isinstance(slot_state, dict | list) else slot_state,
        "first_seen": device.first_seen,
        "last_seen": device.last_seen,
        "last_telemetry_at": device.last_telemetry_at,
        "registered_at": device.created_at,
        "jobs": [job_row(j) for j in recent],
    }
    if rollup is not None:
        detail["last_window"] = {
            "window_start": rollup.window_start,
            "window_seconds": rollup.window_seconds,
            "model_version": rollup.model_version,
            "messages": rollup.messages,
            "inferences": rollup.inferences,
            "errors": rollup.errors,
            "accuracy": (rollup.correct / rollup.labelled) if rollup.labelled else None,
            "mean_latency_s": (rollup.latency_sum_s / rollup.inferences) if rollup.inferences else None,
        }
    return detail
