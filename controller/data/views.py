"""Read-only views the CLI shows: one device with its jobs and latest telemetry, artifact summaries, and the one-line
fleet summary `edgefleet serve` prints while it runs."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from sqlmodel import col, select

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.states import LIVE_ROLLOUT_STATES
from edgefleet.controller.data.tables import DeploymentJob, Device, Rollout, TelemetryRollup

__all__ = ["device_detail", "fleet_line", "job_row"]


def fleet_line(db: Database, fleet: str) -> str:
    """Devices online per class and the model versions they run, and live rollouts, in one line."""
    with db.reading("summarizing the fleet") as session:
        devices = session.exec(select(Device).where(Device.fleet == fleet)).all()
        live = session.exec(select(Rollout).where(col(Rollout.state).in_([s.value for s in LIVE_ROLLOUT_STATES]))).all()
        states = Counter(r.state for r in live)
    if not devices:
        return f"fleet {fleet}: no device registered yet (`edgefleet device register`)"
    parts = []
    for class_name in sorted({d.class_name for d in devices}):
        members = [d for d in devices if d.class_name == class_name]
        online = sum(d.online for d in members)
        versions = Counter(f"v{d.model_version}" if d.model_version is not None else "no model" for d in members)
        running = ", ".join(f"{v} on {n}" for v, n in sorted(versions.items()))
        parts.append(f"{class_name} {online}/{len(members)} online ({running})")
    rollouts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none live"
    return f"fleet {fleet}: {'; '.join(parts)}; rollouts: {rollouts}"


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
