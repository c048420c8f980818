"""Rollouts for operators: start, pause, resume, abort, list and show; each a database transaction with an audit row.

These calls only change the database. The `RolloutEngine` (running in the controller) does the rest on its next
step: it sends the waves' deploy commands, judges the gates, sends the rollbacks of an aborted rollout. So the CLI
works from any machine that reaches the registry, and a controller that restarts finds everything it needs.

Example::

    rollouts = Rollouts(db)
    rollout = rollouts.start("rpi4:3", class_name="rpi4", plan=WavePlan(canary="10%"), on_breach="abort")
    rollouts.pause(rollout.id)
    rollouts.abort(rollout.id, reason="bad canary")
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.states import LIVE_ROLLOUT_STATES, RolloutState, RowState
from edgefleet.controller.data.tables import (
    Artifact,
    AuditEntry,
    DeploymentJob,
    Device,
    DeviceClass,
    Rollout,
    RolloutDevice,
    utcnow,
)
from edgefleet.controller.errors import ConflictError, NotFoundError, RegistryError
from edgefleet.controller.rollout.plan import BREACH_ACTIONS, GATE_NAMES, GateConfig, Selector, WavePlan
from edgefleet.protocols.codes import JobState, ResultCode

__all__ = [
    "Rollouts",
    "abort_in_session",
    "class_current_version",
    "keep_without_rollback",
    "lock_class",
    "matching_devices",
]


def audit(session: Session, *, actor: str, action: str, rollout: Rollout, now: dt.datetime, **detail: Any) -> None:
    """An audit row for a rollout, in the caller's transaction."""
    session.add(
        AuditEntry(
            at=now,
            actor=actor,
            action=action,
            target=f"rollout {rollout.id}",
            detail_json=json.dumps(detail, sort_keys=True, default=str),
        )
    )


def matching_devices(session: Session, class_name: str, selector: Selector) -> list[Device]:
    """Devices of the class that the selector keeps, ordered by id."""
    query = select(Device).where(Device.class_name == class_name).order_by(col(Device.id))
    if selector.device_ids:
        query = query.where(col(Device.id).in_(list(selector.device_ids)))
    if selector.fleet is not None:
        query = query.where(Device.fleet == selector.fleet)
    return [d for d in session.exec(query).all() if selector.matches(d.id, d.fleet)]


def class_current_version(session: Session, class_name: str) -> int | None:
    """The version most devices of the class run (None when none runs a model)."""
    row = session.exec(
        select(Device.model_version, func.count())
        .where(Device.class_name == class_name, col(Device.model_version).is_not(None))
        .group_by(col(Device.model_version))
        .order_by(func.count().desc(), col(Device.model_version).desc())
    ).first()
    return int(row[0]) if row is not None and row[0] is not None else None


def lock_class(session: Session, class_name: str) -> None:
    """Hold the class row until the caller's transaction ends, so checks made after it (a live rollout?) stay true.

    PostgreSQL: SELECT ... FOR UPDATE. SQLite ignores FOR UPDATE and reads outside a transaction until the first
    write, so there a no-op UPDATE of the row takes the database's write lock now (other writers wait for it).
    """
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            sa.update(DeviceClass).where(col(DeviceClass.name) == class_name).values(created_at=DeviceClass.created_at)
        )
    else:
        session.get(DeviceClass, class_name, with_for_update=True)


def abort_in_session(session: Session, rollout: Rollout, *, now: dt.datetime, actor: str, reason: str) -> int:
    """Mark the rollout aborted: unsent devices are cancelled, updated ones get a rollback. Returns rollbacks due.

    An updated device that ran no model before the rollout has nothing to go back to: its row ends at once
    (`keep_without_rollback`) and it is not counted as a rollback due.
    """
    rollout.state = RolloutState.ABORTED.value
    rollout.updated_at = now
    rollout.finished_at = now
    rows = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)).all()
    rollbacks = 0
    for row in rows:
        if row.state == RowState.PENDING:
            row.state, row.finished_at, row.detail = RowState.CANCELLED.value, now, "rollout aborted before sending"
        elif row.state == RowState.ACTIVE and row.previous_version is None:
            keep_without_rollback(session, rollout, row, now=now)
            continue
        elif row.state == RowState.ACTIVE:
            row.state = RowState.ROLLBACK_PENDING.value
            rollbacks += 1
        else:
            continue
        session.add(row)
    session.add(rollout)
    audit(session, actor=actor, action="rollout.abort", rollout=rollout, now=now, reason=reason, rollbacks=rollbacks)
    return rollbacks


def keep_without_rollback(session: Session, rollout: Rollout, row: RolloutDevice, *, now: dt.datetime) -> None:
    """End an aborted rollout's row whose device ran no model before it: there is no model to go back to.

    The device has no previous slot, so a rollback command could only come back `no_previous_model` (or, from an
    offline device, never, holding the rollout unfinished until its device timeout). Its rollback job is recorded
    closed, never sent, with result `no_previous_model` and the reason in words (so `device show` says it too);
    the row ends `no_previous_model`: the device keeps running the rollout's model.
    """
    artifact = session.get(Artifact, rollout.artifact_id)
    version = f"v{artifact.version}" if artifact is not None else "the rollout's model"
    job_id = uuid.uuid4().hex
    session.add(
        DeploymentJob(
            id=job_id,
            device_id=row.device_id,
            artifact_id=rollout.artifact_id,
            state=JobState.FAILED.value,
            result_code=ResultCode.NO_PREVIOUS_MODEL.name.lower(),
            detail=(
                f"rollback (rollout {rollout.id}) not sent: no previous model to go back to, the device ran no "
                f"model before {version}; it keeps running {version}"
            ),
            created_at=now,
            updated_at=now,
            finished_at=now,
        )
    )
    row.rollback_job_id, row.state, row.finished_at = job_id, RowState.NO_PREVIOUS_MODEL.value, now
    row.detail = f"no previous model: the device keeps {version} (it ran no model before this rollout)"
    session.add(row)


class Rollouts:
    """Operator-side rollout operations over a `Database`."""

    def __init__(self, db: Database, *, actor: str = "operator", clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.db = db
        self.actor = actor
        self.clock = clock

    def start(
        self,
        artifact_ref: str | int,
        *,
        class_name: str | None = None,
        plan: WavePlan | None = None,
        gates: GateConfig | None = None,
        on_breach: str = "pause",
        selector: Selector | None = None,
    ) -> Rollout:
        """Record a pending rollout of the artifact to its class (the engine starts it on its next step)."""
        with self.db.transaction("starting a rollout") as session:
            return self._start(
                session, artifact_ref, class_name=class_name, plan=plan, gates=gates, on_breach=on_breach,
                selector=selector,
            )  # fmt: skip

    def _start(
        self,
        session: Session,
        artifact_ref: str | int,
        *,
        class_name: str | None = None,
        plan: WavePlan | None = None,
        gates: GateConfig | None = None,
        on_breach: str = "pause",
        selector: Selector | None = None,
    ) -> Rollout:
        """`start` in the caller's transaction (the recompression loop approves and starts in one)."""
        if on_breach not in BREACH_ACTIONS:
            raise RegistryError(f"--on-breach {on_breach!r} is not one of {', '.join(BREACH_ACTIONS)}")
        plan, gates, selector = plan or WavePlan(), gates or GateConfig(), selector or Selector()
        artifact = ArtifactCatalog._lookup(session, artifact_ref)  # same lookup as the catalog
        if artifact is None:
            raise NotFoundError(f"artifact {artifact_ref!r} does not exist (see `edgefleet artifact list`)")
        if class_name is not None and class_name != artifact.class_name:
            raise RegistryError(
                f"artifact {artifact.id} is built for class {artifact.class_name}, not {class_name}; "
                "a rollout targets the artifact's own class"
            )
        lock_class(session, artifact.class_name)  # two starts for one class: the second waits, then sees busy
        busy = session.exec(
            select(Rollout).where(
                Rollout.class_name == artifact.class_name,
                col(Rollout.state).in_([s.value for s in LIVE_ROLLOUT_STATES]),
            )
        ).first()
        if busy is not None:
            raise ConflictError(
                f"rollout {busy.id} to class {artifact.class_name} is {busy.state}: "
                f"finish or abort it first (`edgefleet rollout abort {busy.id}`)"
            )
        targets = matching_devices(session, artifact.class_name, selector)
        if not targets:
            raise NotFoundError(f"no devices in class {artifact.class_name} match the rollout's target")
        rollout = self._record(session, artifact, plan=plan, gates=gates, on_breach=on_breach, selector=selector)
        rollout.previous_version = class_current_version(session, artifact.class_name)
        rollout.wave_count = len(plan.sizes(len(targets)))
        session.add(rollout)
        session.flush()
        audit(
            session,
            actor=self.actor,
            action="rollout.start",
            rollout=rollout,
            now=rollout.created_at,
            artifact=artifact.id,
            version=artifact.version,
            devices=len(targets),
            plan=plan.model_dump(),
            on_breach=on_breach,
        )
        return rollout

    def _record(
        self,
        session: Session,
        artifact: Artifact,
        *,
        plan: WavePlan,
        gates: GateConfig,
        on_breach: str,
        selector: Selector,
    ) -> Rollout:
        now = self.clock()
        return Rollout(
            artifact_id=artifact.id or 0,
            class_name=artifact.class_name,
            state=RolloutState.PENDING.value,
            on_breach=on_breach,
            plan_json=plan.model_dump_json(),
            gates_json=gates.model_dump_json(),
            selector_json=selector.model_dump_json(),
            actor=self.actor,
            created_at=now,
            updated_at=now,
        )

    def _get(self, session: Session, rollout_id: int) -> Rollout:
        rollout = session.get(Rollout, rollout_id, with_for_update=True)
        if rollout is None:
            raise NotFoundError(f"rollout {rollout_id} does not exist (see `edgefleet rollout list`)")
        return rollout

    def pause(self, rollout_id: int, *, reason: str = "operator") -> Rollout:
        with self.db.transaction(f"pausing rollout {rollout_id}") as session:
            rollout = self._get(session, rollout_id)
            if rollout.state not in {RolloutState.PENDING, RolloutState.RUNNING}:
                raise ConflictError(f"rollout {rollout_id} is {rollout.state}; only a pending or running one pauses")
            now = self.clock()
            rollout.state, rollout.updated_at = RolloutState.PAUSED.value, now
            rollout.breach_json = json.dumps({"by": self.actor, "reason": reason, "at": now.isoformat()})
            session.add(rollout)
            audit(session, actor=self.actor, action="rollout.pause", rollout=rollout, now=now, reason=reason)
        return rollout

    def resume(self, rollout_id: int, *, waive: Sequence[str] = ()) -> Rollout:
        """Resume a paused rollout; its gates judge fresh telemetry from now on, `waive`d gates no longer stop it."""
        unknown = sorted(set(waive) - set(GATE_NAMES))
        if unknown:
            raise RegistryError(f"unknown gate(s) {', '.join(unknown)}; gates are {', '.join(GATE_NAMES)}")
        with self.db.transaction(f"resuming rollout {rollout_id}") as session:
            rollout = self._get(session, rollout_id)
            if rollout.state != RolloutState.PAUSED:
                raise ConflictError(f"rollout {rollout_id} is {rollout.state}; only a paused one resumes")
            now = self.clock()
            gates = GateConfig.model_validate_json(rollout.gates_json)
            if waive:
                gates = gates.model_copy(update={"waived": tuple(sorted({*gates.waived, *waive}))})
                rollout.gates_json = gates.model_dump_json()
            rollout.state, rollout.updated_at = RolloutState.RUNNING.value, now
            rollout.judge_since, rollout.breach_json = now, None
            session.add(rollout)
            audit(session, actor=self.actor, action="rollout.resume", rollout=rollout, now=now, waived=list(waive))
        return rollout

    def abort(self, rollout_id: int, *, reason: str = "operator") -> tuple[Rollout, int]:
        """Abort; the engine sends rollbacks to the devices already updated. Returns (rollout, rollbacks due)."""
        with self.db.transaction(f"aborting rollout {rollout_id}") as session:
            rollout = self._get(session, rollout_id)
            if rollout.state not in {s.value for s in LIVE_ROLLOUT_STATES}:
                raise ConflictError(f"rollout {rollout_id} is already {rollout.state}")
            rollout.breach_json = json.dumps({"by": self.actor, "reason": reason})
            rollbacks = abort_in_session(session, rollout, now=self.clock(), actor=self.actor, reason=reason)
        return rollout, rollbacks

    def list(self, *, limit: int = 100) -> list[tuple[Rollout, Artifact | None]]:
        with self.db.reading("listing rollouts") as session:
            rows = session.exec(select(Rollout).order_by(col(Rollout.id).desc()).limit(limit)).all()
            return [(r, session.get(Artifact, r.artifact_id)) for r in rows]

    def get(self, rollout_id: int) -> Rollout:
        with self.db.reading(f"reading rollout {rollout_id}") as session:
            rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            raise NotFoundError(f"rollout {rollout_id} does not exist (see `edgefleet rollout list`)")
        return rollout

    def latest_id(self) -> int:
        with self.db.reading("finding the latest rollout") as session:
            found = session.exec(select(Rollout.id).order_by(col(Rollout.id).desc())).first()
        if found is None:
            raise NotFoundError("there are no rollouts yet (start one with `edgefleet rollout start`)")
        return int(found)
