"""The rollout engine: each `tick(now)` moves every live rollout one step, each step one database transaction.

A step is one of: start a pending rollout; bring devices' rows up to date from their jobs (a silent device past its
timeout becomes `timed_out`, its job `failed`); judge the gates (a breach pauses, or aborts with rollbacks); open the
next wave or complete; create the jobs of pending devices within the concurrency cap; publish the jobs still
`queued`; give devices that came back or joined later the class's current model (catch-up).

Jobs are rows (`queued`) before their command is published and become `sent` after the broker acknowledged it, so a
controller killed at any moment republishes, on restart, exactly the commands whose jobs are still queued, with the
same job ids (an agent answers a job id it already ran without running it again). Nothing is kept in memory between
ticks.

Example::

    engine = RolloutEngine(db, publisher=mqtt_client)
    engine.tick()                       # e.g. every second from the controller's timer
    engine.on_device_online("pi-007")   # from the birth handler: catch-up at once
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable, Sequence

from sqlmodel import Session, col, select

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.states import DONE_ROW_STATES, JobRecordState, RolloutState, RowState
from edgefleet.controller.data.tables import Artifact, DeploymentJob, Device, Rollout, RolloutDevice, utcnow
from edgefleet.controller.errors import ControllerError
from edgefleet.controller.rollout.api import audit, keep_without_rollback, matching_devices
from edgefleet.controller.rollout.judge import judge_rollout
from edgefleet.controller.rollout.plan import LATE_WAVE, Selector, WavePlan
from edgefleet.controller.rollout.sync import sync_rows
from edgefleet.controller.service.deploy import Publisher
from edgefleet.controller.service.metrics import ControllerMetrics
from edgefleet.protocols.codec import encode
from edgefleet.protocols.commands import DeployCommand, RollbackCommand, expiry_seconds
from edgefleet.protocols.errors import ProtocolError
from edgefleet.protocols.manifest import SignedManifest
from edgefleet.protocols.topics import command_topic

__all__ = ["LATE_WAVE", "RolloutEngine", "TickReport"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclasses.dataclass(slots=True)
class TickReport:
    """What one tick did (for logs and tests)."""

    started: int = 0
    jobs_created: int = 0
    published: int = 0
    publish_errors: int = 0
    rows_changed: int = 0
    breaches: int = 0
    waves_opened: int = 0
    completed: int = 0
    caught_up: int = 0


class RolloutEngine:
    """Drives the rollouts stored in the database; owns no state of its own (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        *,
        publisher: Publisher,
        metrics: ControllerMetrics | None = None,
        actor: str = "controller",
        clock: Callable[[], dt.datetime] = utcnow,
        publish_timeout: float = 10.0,
    ) -> None:
        self.db = db
        self.publisher = publisher
        self.metrics = metrics
        self.actor = actor
        self.clock = clock
        self.publish_timeout = publish_timeout

    # ------------------------------------------------------------------ the step
    def tick(self, now: dt.datetime | None = None) -> TickReport:
        """One pass over every rollout that still has work; never raises for one rollout's failure."""
        now = now or self.clock()
        report = TickReport()
        for rollout_id in self._ids((RolloutState.PENDING,)):
            self._guard(rollout_id, lambda rid: self._start(rid, now, report))
        for rollout_id in self._ids((RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTED), busy=True):
            self._guard(rollout_id, lambda rid: self._step(rid, now, report))
        self._guard(0, lambda _: self._catch_up_all(now, report))
        self._guard(0, lambda _: self._publish_queued(now, report))
        return report

    def on_device_online(self, device_id: str, *, now: dt.datetime | None = None) -> int:
        """Give a device that (re)connected the class's current model now; returns the jobs created (0 or 1)."""
        now = now or self.clock()
        report = TickReport()
        try:
            with self.db.reading("checking a device's model") as session:
                device = session.get(Device, device_id)
            if device is None:
                return 0
            self._catch_up_class(device.class_name, now, report, only=device_id)
            self._publish_queued(now, report)
        except ControllerError as exc:
            log.warning("catch-up for device %s failed, the next tick retries: %s", device_id, exc)
        return report.jobs_created

    def _guard(self, rollout_id: int, step: Callable[[int], None]) -> None:
        try:
            step(rollout_id)
        except ControllerError as exc:
            log.warning("rollout %s: step failed, the next tick retries: %s", rollout_id or "-", exc)

    def _ids(self, states: Sequence[RolloutState], *, busy: bool = False) -> list[int]:
        with self.db.reading("listing live rollouts") as session:
            ids = set(session.exec(select(Rollout.id).where(col(Rollout.state).in_([s.value for s in states]))).all())
            if busy:  # aborted and completed rollouts still have work while a row is not final
                live = [RowState.PENDING, RowState.IN_PROGRESS, RowState.ROLLBACK_PENDING, RowState.ROLLING_BACK]
                ids |= set(
                    session.exec(
                        select(RolloutDevice.rollout_id).where(col(RolloutDevice.state).in_([s.value for s in live]))
                    ).all()
                )
        return sorted(i for i in ids if i is not None)

    def _start(self, rollout_id: int, now: dt.datetime, report: TickReport) -> None:
        with self.db.transaction(f"starting rollout {rollout_id}") as session:
            rollout = session.get(Rollout, rollout_id, with_for_update=True)
            if rollout is None or rollout.state != RolloutState.PENDING:
                return
            rollout.state, rollout.updated_at = RolloutState.RUNNING.value, now
            session.add(rollout)
            audit(session, actor=self.actor, action="rollout.running", rollout=rollout, now=now)
        report.started += 1
        self._step(rollout_id, now, report)

    def _step(self, rollout_id: int, now: dt.datetime, report: TickReport) -> None:
        with self.db.transaction(f"updating the devices of rollout {rollout_id}") as session:
            report.rows_changed += sync_rows(session, rollout_id, now=now)
        with self.db.transaction(f"judging the gates of rollout {rollout_id}") as session:
            if judge_rollout(session, rollout_id, now=now, actor=self.actor):
                report.breaches += 1
        with self.db.transaction(f"advancing rollout {rollout_id}") as session:
            self._advance(session, rollout_id, now, report)
        with self.db.transaction(f"creating the jobs of rollout {rollout_id}") as session:
            self._create_jobs(session, rollout_id, now, report)

    # ------------------------------------------------------------------ waves
    def _advance(self, session: Session, rollout_id: int, now: dt.datetime, report: TickReport) -> None:
        rollout = session.get(Rollout, rollout_id, with_for_update=True)
        if rollout is None or rollout.state != RolloutState.RUNNING:
            return
        rows = list(session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all())
        current = [r for r in rows if r.wave == rollout.current_wave]
        if rollout.current_wave >= 0 and any(r.state not in DONE_ROW_STATES for r in current):
            return
        if rollout.current_wave >= 0 and not _gates_pass(rollout):
            return
        artifact = session.get(Artifact, rollout.artifact_id)
        assert artifact is not None  # noqa: S101 - a foreign key
        selector = Selector.model_validate_json(rollout.selector_json)
        taken = {r.device_id for r in rows} | _busy_elsewhere(session, rollout_id)
        targets = matching_devices(session, rollout.class_name, selector)
        behind = [d for d in targets if d.id not in taken and _older(d, artifact.version)]
        eligible = [d for d in behind if d.online]
        if not eligible and behind and rollout.current_wave < 0:
            return  # no canary can go out before a device is online: wait (a rollout never completes unjudged)
        if not eligible:
            rollout.state, rollout.finished_at, rollout.updated_at = RolloutState.COMPLETED.value, now, now
            session.add(rollout)
            audit(session, actor=self.actor, action="rollout.complete", rollout=rollout, now=now, devices=len(rows))
            report.completed += 1
            return
        wave = rollout.current_wave + 1
        sizes = WavePlan.model_validate_json(rollout.plan_json).sizes(len(targets))
        size = sizes[wave] if wave < len(sizes) - 1 else len(eligible)
        for device in eligible[:size]:
            session.add(
                RolloutDevice(
                    rollout_id=rollout_id,
                    device_id=device.id,
                    wave=wave,
                    state=RowState.PENDING.value,
                    previous_version=device.model_version,
                )
            )
        rollout.current_wave, rollout.wave_started_at, rollout.updated_at = wave, now, now
        rollout.wave_count = max(rollout.wave_count, wave + 1, len(sizes))
        session.add(rollout)
        audit(session, actor=self.actor, action="rollout.wave", rollout=rollout, now=now, wave=wave, devices=size)
        report.waves_opened += 1

    # ------------------------------------------------------------------ jobs
    def _create_jobs(self, session: Session, rollout_id: int, now: dt.datetime, report: TickReport) -> None:
        rollout = session.get(Rollout, rollout_id, with_for_update=True)
        if rollout is None:
            return
        plan = WavePlan.model_validate_json(rollout.plan_json)
        rows = list(session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all())
        for row in rows:  # rollbacks go out in any state of the rollout
            if row.state == RowState.ROLLBACK_PENDING:
                self._new_rollback_job(session, rollout, row, now)
                report.jobs_created += 1
        if rollout.state not in {RolloutState.RUNNING, RolloutState.COMPLETED}:
            return
        in_flight = sum(1 for r in rows if r.state == RowState.IN_PROGRESS)
        room = max(0, plan.max_concurrent - in_flight)
        for row in [r for r in rows if r.state == RowState.PENDING][:room]:
            job_id = uuid.uuid4().hex
            session.add(
                DeploymentJob(
                    id=job_id,
                    device_id=row.device_id,
                    artifact_id=rollout.artifact_id,
                    state=JobRecordState.QUEUED.value,
                    detail=f"rollout {rollout_id} wave {row.wave}",
                    created_at=now,
                    updated_at=now,
                )
            )
            row.job_id, row.state, row.sent_at, row.attempts = job_id, RowState.IN_PROGRESS.value, now, row.attempts + 1
            session.add(row)
            report.jobs_created += 1

    def _new_rollback_job(self, session: Session, rollout: Rollout, row: RolloutDevice, now: dt.datetime) -> None:
        """The rollback job of an aborted rollout's updated device (a first model has none: `keep_without_rollback`)."""
        if row.previous_version is None:
            keep_without_rollback(session, rollout, row, now=now)
            return
        previous = session.exec(
            select(Artifact.id).where(
                Artifact.class_name == rollout.class_name, Artifact.version == row.previous_version
            )
        ).first()
        job_id = uuid.uuid4().hex
        session.add(
            DeploymentJob(
                id=job_id,
                device_id=row.device_id,
                artifact_id=previous or rollout.artifact_id,
                state=JobRecordState.QUEUED.value,
                detail=f"rollback (rollout {rollout.id})",
                created_at=now,
                updated_at=now,
            )
        )
        row.rollback_job_id, row.state, row.sent_at = job_id, RowState.ROLLING_BACK.value, now
        session.add(row)

    def _publish_queued(self, now: dt.datetime, report: TickReport) -> None:
        """Publish the command of every rollout job still `queued` (new ones, and those a crash left unsent)."""
        with self.db.reading("finding unsent rollout jobs") as session:
            pairs = session.exec(
                select(RolloutDevice, DeploymentJob)
                .join(
                    DeploymentJob,
                    (col(RolloutDevice.job_id) == col(DeploymentJob.id))
                    | (col(RolloutDevice.rollback_job_id) == col(DeploymentJob.id)),
                )
                .where(DeploymentJob.state == JobRecordState.QUEUED.value)
            ).all()
            found = []
            for row, job in pairs:
                device = session.get(Device, row.device_id)
                rollout = session.get(Rollout, row.rollout_id)
                artifact = session.get(Artifact, rollout.artifact_id) if rollout is not None else None
                if device is not None and rollout is not None and artifact is not None:
                    found.append((row, job, device, rollout, artifact))
        sent: list[str] = []
        for row, job, device, rollout, artifact in found:
            command = self._command(row, job, rollout, artifact)
            if command is None:
                continue
            try:
                self.publisher.publish(
                    command_topic(device.fleet, device.id),
                    encode(command),
                    qos=1,
                    expiry_s=expiry_seconds(command, now=now),
                    timeout=self.publish_timeout,
                )
            except (ControllerError, ProtocolError) as exc:
                report.publish_errors += 1
                log.warning(
                    "rollout %s: command to %s not published, retrying next tick: %s", rollout.id, device.id, exc
                )
                continue
            if self.metrics is not None:
                self.metrics.commands.labels(command.type).inc()
            sent.append(job.id)
        if sent:
            with self.db.transaction("recording rollout publishes") as session:
                for job_id in sent:
                    stored = session.get(DeploymentJob, job_id, with_for_update=True)
                    if (
                        stored is not None and stored.state == JobRecordState.QUEUED.value
                    ):  # the device may have answered already
                        stored.state, stored.updated_at = JobRecordState.SENT.value, now
                        session.add(stored)
            report.published += len(sent)

    @staticmethod
    def _command(
        row: RolloutDevice, job: DeploymentJob, rollout: Rollout, artifact: Artifact
    ) -> DeployCommand | RollbackCommand | None:
        timeout = dt.timedelta(seconds=WavePlan.model_validate_json(rollout.plan_json).device_timeout_s)
        issued = job.created_at
        if job.id == row.rollback_job_id:
            return RollbackCommand(
                job_id=job.id,
                issued_at=issued,
                expires_at=issued + timeout,
                target_version=row.previous_version,
                reason=f"rollout {rollout.id} aborted",
            )
        signed = SignedManifest.model_validate_json(artifact.manifest_json)
        expires = min(issued + timeout, signed.manifest.expires_at)
        if expires <= issued:
            return None
        return DeployCommand(job_id=job.id, issued_at=issued, expires_at=expires, manifest=signed)

    # ------------------------------------------------------------------ catch-up
    def _catch_up_all(self, now: dt.datetime, report: TickReport) -> None:
        with self.db.reading("listing classes with a completed rollout") as session:
            classes = sorted(
                set(session.exec(select(Rollout.class_name).where(Rollout.state == RolloutState.COMPLETED)).all())
            )
        for class_name in classes:
            self._catch_up_class(class_name, now, report)

    def _catch_up_class(
        self, class_name: str, now: dt.datetime, report: TickReport, *, only: str | None = None
    ) -> None:
        """Devices of the class online on an older model than its last completed rollout's get that model."""
        with self.db.transaction(f"catching up class {class_name}") as session:
            rollouts = session.exec(
                select(Rollout).where(Rollout.class_name == class_name).order_by(col(Rollout.id).desc())
            ).all()
            if not rollouts or any(r.state in {RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED}
                                   for r in rollouts):  # fmt: skip
                return  # a live rollout takes devices in its own waves
            current = next((r for r in rollouts if r.state == RolloutState.COMPLETED), None)
            if current is None or current.id is None:
                return
            artifact = session.get(Artifact, current.artifact_id)
            assert artifact is not None  # noqa: S101 - a foreign key
            rows = {
                r.device_id: r
                for r in session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == current.id)).all()
            }
            selector = Selector.model_validate_json(current.selector_json)
            added = 0
            for device in matching_devices(session, class_name, selector):
                if (
                    (only is not None and device.id != only)
                    or not device.online
                    or not _older(device, artifact.version)
                ):
                    continue
                row = rows.get(device.id)
                if row is None:
                    row = RolloutDevice(rollout_id=current.id, device_id=device.id, wave=LATE_WAVE, state="")
                elif not _returned_after_timeout(row, device):
                    continue
                row.state, row.previous_version, row.detail = RowState.PENDING.value, device.model_version, "catch-up"
                session.add(row)
                added += 1
        if added:
            report.caught_up += added
            with self.db.transaction(f"creating catch-up jobs of rollout {current.id}") as session:
                self._create_jobs(session, current.id, now, report)


def _busy_elsewhere(session: Session, rollout_id: int) -> set[str]:
    """Devices with a job in flight in another rollout (a catch-up, a rollback): they join a later wave."""
    busy = [s.value for s in (RowState.PENDING, RowState.IN_PROGRESS, RowState.ROLLBACK_PENDING, RowState.ROLLING_BACK)]
    found = session.exec(
        select(RolloutDevice.device_id).where(
            RolloutDevice.rollout_id != rollout_id, col(RolloutDevice.state).in_(busy)
        )
    ).all()
    return set(found)


def _older(device: Device, version: int) -> bool:
    return device.model_version is None or device.model_version < version


def _returned_after_timeout(row: RolloutDevice, device: Device) -> bool:
    """A device that timed out and has reconnected since gets another try (a few at most)."""
    return (
        row.state == RowState.TIMED_OUT
        and row.attempts < MAX_ATTEMPTS
        and device.connected_at is not None
        and row.finished_at is not None
        and device.connected_at > row.finished_at
    )


def _gates_pass(rollout: Rollout) -> bool:
    results = json.loads(rollout.gate_results_json or "{}").get("gates", [])
    return bool(results) and all(g["status"] in {"pass", "off", "waived"} for g in results)
