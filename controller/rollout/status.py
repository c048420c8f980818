"""A rollout as operators and dashboards see it: waves, devices per state, gates against thresholds, the breach.

`describe` returns plain JSON-ready data; the CLI renders it as tables and progress bars, `--json` prints it.
`device_notes` says, per device, why it ended off the plan (failed, timed out, rolled back, nothing to go back to).

Example::

    view = describe(db, 3)
    view["waves"][0]   # {"wave": 0, "label": "canary", "planned": 2, "devices": 2, "states": {"active": 2}}
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from sqlmodel import Session, select

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.states import FINAL_ROW_STATES, RowState
from edgefleet.controller.data.tables import Artifact, Rollout, RolloutDevice
from edgefleet.controller.errors import NotFoundError
from edgefleet.controller.rollout.api import matching_devices
from edgefleet.controller.rollout.plan import LATE_WAVE, GateConfig, Selector, WavePlan

__all__ = ["describe", "describe_in_session", "summary_row", "wave_label"]

MAX_NOTES = 20
# Rows whose detail explains an outcome off the plan (cancelled rows all say the same: the abort).
NOTED_ROW_STATES = frozenset(
    {RowState.FAILED, RowState.TIMED_OUT, RowState.ROLLED_BACK, RowState.ROLLBACK_FAILED, RowState.NO_PREVIOUS_MODEL}
)


def wave_label(wave: int) -> str:
    if wave == LATE_WAVE:
        return "late"
    return "canary" if wave == 0 else f"wave {wave}"


def describe(db: Database, rollout_id: int) -> dict[str, Any]:
    with db.reading(f"reading rollout {rollout_id}") as session:
        return describe_in_session(session, rollout_id)


def describe_in_session(session: Session, rollout_id: int) -> dict[str, Any]:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist (see `edgefleet rollout list`)")
    artifact = session.get(Artifact, rollout.artifact_id)
    rows = list(session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all())
    plan = WavePlan.model_validate_json(rollout.plan_json)
    targets = len(matching_devices(session, rollout.class_name, Selector.model_validate_json(rollout.selector_json)))
    planned = plan.sizes(targets)
    waves: dict[int, Counter[str]] = {}
    for row in rows:
        waves.setdefault(row.wave, Counter())[row.state] += 1
    indices = sorted(set(range(max(rollout.wave_count, len(planned)))) | set(waves))
    results = json.loads(rollout.gate_results_json or "{}")
    return {
        "id": rollout.id,
        "state": rollout.state,
        "class": rollout.class_name,
        "artifact": artifact.id if artifact else rollout.artifact_id,
        "model": artifact.model_name if artifact else None,
        "version": artifact.version if artifact else None,
        "previous_version": rollout.previous_version,
        "on_breach": rollout.on_breach,
        "plan": plan.model_dump(),
        "gate_config": GateConfig.model_validate_json(rollout.gates_json).model_dump(),
        "selector": Selector.model_validate_json(rollout.selector_json).model_dump(),
        "current_wave": rollout.current_wave,
        "wave_count": max(rollout.wave_count, len(planned)),
        "targets": targets,
        "waves": [
            {
                "wave": i,
                "label": wave_label(i),
                "planned": planned[i] if 0 <= i < len(planned) else None,
                "devices": sum(waves.get(i, Counter()).values()),
                "states": dict(sorted(waves.get(i, Counter()).items())),
            }
            for i in indices
        ],
        "totals": dict(sorted(Counter(r.state for r in rows).items())),
        "unfinished_devices": sum(1 for r in rows if r.state not in FINAL_ROW_STATES),
        "device_notes": _notes(rows),
        "gates": results.get("gates", []),
        "accuracy_floor_source": results.get("accuracy_floor_source"),
        "breach": json.loads(rollout.breach_json) if rollout.breach_json else None,
        "created_at": rollout.created_at.isoformat(),
        "updated_at": rollout.updated_at.isoformat(),
        "finished_at": rollout.finished_at.isoformat() if rollout.finished_at else None,
    }


def _notes(rows: list[RolloutDevice]) -> list[dict[str, Any]]:
    """Why devices ended off the plan, in words (the first `MAX_NOTES` by device id; `totals` counts them all).

    e.g. {"device": "pi-007", "wave": 0, "state": "no_previous_model",
    "detail": "no previous model: the device keeps v1 (it ran no model before this rollout)"}
    """
    noted = sorted((r for r in rows if r.state in NOTED_ROW_STATES and r.detail), key=lambda r: r.device_id)
    return [{"device": r.device_id, "wave": r.wave, "state": r.state, "detail": r.detail} for r in noted[:MAX_NOTES]]


def summary_row(rollout: Rollout, artifact: Artifact | None) -> dict[str, Any]:
    """One line of `rollout list`."""
    return {
        "id": rollout.id,
        "state": rollout.state,
        "class": rollout.class_name,
        "artifact": f"{artifact.model_name} v{artifact.version}" if artifact else str(rollout.artifact_id),
        "wave": wave_label(rollout.current_wave) if rollout.current_wave >= 0 else "-",
        "waves": rollout.wave_count,
        "on_breach": rollout.on_breach,
        "created_at": rollout.created_at,
        "finished_at": rollout.finished_at,
    }
