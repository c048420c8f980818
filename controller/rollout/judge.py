"""Judging a running rollout's gates and acting on a breach (pause, or abort with rollbacks), in one transaction.

The verdicts are stored in `rollouts.gate_results_json` (what `rollout status` and the metrics show). A gate still
waiting for evidence `data_wait_s` after the current wave finished counts as breached: a model whose devices report
nothing is not known to be healthy.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from sqlmodel import Session, col, select

from edgefleet.controller.data.registry import profile_of
from edgefleet.controller.data.states import DONE_ROW_STATES, RolloutState, RowState
from edgefleet.controller.data.tables import Artifact, Device, DeviceClass, Rollout, RolloutDevice
from edgefleet.controller.rollout.api import abort_in_session, audit
from edgefleet.controller.rollout.gates import (
    BREACH,
    PASS,
    WAITING,
    Evidence,
    GateResult,
    Outcomes,
    accuracy_of_version,
    accuracy_threshold,
    collect_evidence,
    judge,
)
from edgefleet.controller.rollout.plan import GateConfig

__all__ = ["judge_rollout"]

BASELINE_WINDOW = dt.timedelta(hours=24)
_TELEMETRY_GATES = frozenset({"accuracy", "latency_p95", "error_rate"})
_FAILED_ROWS = frozenset({RowState.FAILED, RowState.TIMED_OUT, RowState.ROLLED_BACK})
# A device whose last telemetry is older than this "sends no telemetry" (a window is 60 s by default).
_STALE_TELEMETRY_S = 180.0


def judge_rollout(session: Session, rollout_id: int, *, now: dt.datetime, actor: str) -> bool:
    """Judge the gates of a running rollout; True when one breached (the rollout is now paused or aborted)."""
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is None or rollout.state != RolloutState.RUNNING or rollout.current_wave < 0:
        return False
    artifact = session.get(Artifact, rollout.artifact_id)
    class_row = session.get(DeviceClass, rollout.class_name)
    assert artifact is not None  # noqa: S101 - a foreign key
    assert class_row is not None  # noqa: S101 - a foreign key
    results, source = _verdicts(session, rollout, artifact, class_row, now=now)
    document = json.dumps(
        {"gates": [r.to_json() for r in results], "accuracy_floor_source": source, "wave": rollout.current_wave}
    )
    if document != rollout.gate_results_json:
        rollout.gate_results_json = document
        session.add(rollout)
    breached = [r for r in results if r.status == BREACH]
    if not breached:
        return False
    detail = {
        "gates": [r.to_json() for r in breached],
        "wave": rollout.current_wave,
        "action": rollout.on_breach,
        "at": now.isoformat(),
    }
    rollout.breach_json = json.dumps(detail)
    rollout.updated_at = now
    reason = "gate breached: " + ", ".join(r.name for r in breached)
    if rollout.on_breach == "abort":
        abort_in_session(session, rollout, now=now, actor=actor, reason=reason)
    else:
        rollout.state = RolloutState.PAUSED.value
        session.add(rollout)
        audit(session, actor=actor, action="rollout.pause", rollout=rollout, now=now, reason=reason, breach=detail)
    return True


def _verdicts(
    session: Session, rollout: Rollout, artifact: Artifact, class_row: DeviceClass, *, now: dt.datetime
) -> tuple[list[GateResult], str]:
    gates = GateConfig.model_validate_json(rollout.gates_json)
    rows = list(session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)).all())
    outcomes = Outcomes(
        assigned=len(rows),
        done=sum(1 for r in rows if r.state in DONE_ROW_STATES),
        failed=sum(1 for r in rows if r.state in _FAILED_ROWS),
        active_devices=sum(1 for r in rows if r.state == RowState.ACTIVE),
    )
    since = now - dt.timedelta(seconds=gates.window_s)
    if rollout.judge_since is not None:
        since = max(since, rollout.judge_since)
    evidence = collect_evidence(
        session,
        device_ids=[r.device_id for r in rows],
        version=artifact.version,
        class_name=rollout.class_name,
        since=since,
    )
    previous = None
    if rollout.previous_version is not None and rollout.previous_version != artifact.version:
        previous = accuracy_of_version(
            session,
            class_name=rollout.class_name,
            version=rollout.previous_version,
            since=now - BASELINE_WINDOW,
            min_labelled=gates.min_labelled,
        )
    measured = json.loads(artifact.metrics_json or "{}").get("accuracy")
    profile = profile_of(class_row)
    floor, source = accuracy_threshold(
        gates,
        profile,
        previous_accuracy=previous,
        artifact_accuracy=float(measured) if isinstance(measured, int | float) else None,
    )
    results = judge(
        gates,
        evidence=evidence,
        outcomes=outcomes,
        latency_budget_s=profile.latency_budget_ms / 1000,
        accuracy_floor=floor,
    )
    results = _await_wave(session, results, rollout, rows, gates=gates, artifact=artifact, since=since)
    results = _explain_waits(session, results, rows, evidence, version=artifact.version, now=now)
    return _starved(results, rollout, rows, gates, now=now), source


def _await_wave(
    session: Session,
    results: list[GateResult],
    rollout: Rollout,
    rows: list[RolloutDevice],
    *,
    gates: GateConfig,
    artifact: Artifact,
    since: dt.datetime,
) -> list[GateResult]:
    """Telemetry gates pass a wave only once enough of that wave's own devices have reported."""
    active = [r.device_id for r in rows if r.wave == rollout.current_wave and r.state == RowState.ACTIVE]
    needed = min(gates.min_devices, len(active))
    if needed == 0:
        return results
    wave = collect_evidence(
        session, device_ids=active, version=artifact.version, class_name=rollout.class_name, since=since
    )
    if wave.devices >= needed:
        return results
    detail = f"waiting for telemetry from {needed} device(s) of wave {rollout.current_wave} ({wave.devices} so far)"
    return [
        dataclasses.replace(r, status=WAITING, detail=detail) if r.status == PASS and r.name in _TELEMETRY_GATES else r
        for r in results
    ]


_SHOWN_IDS = 3
_IN_FLIGHT = frozenset({RowState.PENDING, RowState.IN_PROGRESS})


def _explain_waits(
    session: Session,
    results: list[GateResult],
    rows: list[RolloutDevice],
    evidence: Evidence,
    *,
    version: int,
    now: dt.datetime,
) -> list[GateResult]:
    """A waiting telemetry gate names the devices it waits for and why they are silent (an operator can act)."""
    waiting = [r for r in results if r.status == WAITING and r.name in _TELEMETRY_GATES]
    if not waiting:
        return results
    devices = {
        d.id: d for d in session.exec(select(Device).where(col(Device.id).in_([r.device_id for r in rows]))).all()
    }
    notes = {
        name: _silence(rows, devices, evidence, labels=name == "accuracy", version=version, now=now)
        for name in {r.name for r in waiting}
    }
    return [
        dataclasses.replace(r, detail=f"{r.detail}; {notes[r.name]}") if r in waiting and notes[r.name] else r
        for r in results
    ]


def _silence(
    rows: list[RolloutDevice],
    devices: dict[str, Device],
    evidence: Evidence,
    *,
    labels: bool,
    version: int,
    now: dt.datetime,
) -> str:
    reasons: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: r.device_id):
        device = devices.get(row.device_id)
        reason = _why_silent(row, device, evidence, labels=labels, version=version, now=now)
        if reason:
            reasons.setdefault(reason, []).append(row.device_id)
    return "; ".join(f"{len(ids)} {why}: {_ids(ids)}" for why, ids in reasons.items())


def _why_silent(
    row: RolloutDevice,
    device: Device | None,
    evidence: Evidence,
    *,
    labels: bool,
    version: int,
    now: dt.datetime,
) -> str | None:
    if row.state in _IN_FLIGHT:
        return _why_in_flight(device, version=version)
    if row.state != RowState.ACTIVE:
        return None
    if device is not None and not device.online:
        return "offline"
    if row.device_id not in evidence.reporting:
        return _why_no_inferences(row, device, version=version, now=now)
    if labels and row.device_id not in evidence.labelled_by:
        return "inferring without labels (the application reports none; a simulated device needs --dataset)"
    return None


def _why_no_inferences(row: RolloutDevice, device: Device | None, *, version: int, now: dt.datetime) -> str:
    seen = _aware(device.last_telemetry_at) if device is not None and device.last_telemetry_at else None
    switched = _aware(row.finished_at) if row.finished_at is not None else None
    if seen is not None and (switched is None or seen >= switched):
        return f"online, not inferring on v{version}"  # telemetry came since it switched, with no inference
    if switched is not None and (now - switched).total_seconds() <= _STALE_TELEMETRY_S:
        return f"on v{version} since {switched:%H:%M:%S} UTC, its first telemetry window not in yet"
    return "online, sending no telemetry"


def _why_in_flight(device: Device | None, *, version: int) -> str:
    if device is not None and device.first_seen is None:
        return "never connected (check the device's fleet, broker address and password)"
    if device is not None and not device.online:
        return f"offline, v{version} not installed yet"
    return f"installing v{version}"


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:_SHOWN_IDS])
    return f"{shown} and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else shown


def _starved(
    results: list[GateResult], rollout: Rollout, rows: list[RolloutDevice], gates: GateConfig, *, now: dt.datetime
) -> list[GateResult]:
    """Gates still waiting `data_wait_s` after the current wave finished are breached."""
    wave = [r for r in rows if r.wave == rollout.current_wave]
    if not wave or any(r.state not in DONE_ROW_STATES for r in wave):
        return results
    finished = max((r.finished_at for r in wave if r.finished_at is not None), default=now)
    reference = max(finished, rollout.judge_since or finished)
    if (now - reference).total_seconds() <= gates.data_wait_s:
        return results
    return [
        dataclasses.replace(r, status=BREACH, detail=f"no evidence within {gates.data_wait_s:g}s: {r.detail}")
        if r.status == WAITING
        else r
        for r in results
    ]
