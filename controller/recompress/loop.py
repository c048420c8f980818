"""The closed loop: field telemetry triggers a recompression, a new artifact, and a gated rollout of it.

`RecompressionLoop.step(now)` (from the controller's timer, like the rollout engine) checks every class that has a
policy. A trigger is recorded with its evidence (and the audit log), the class profile's speed correction is updated
when the field measured one, and a build is requested from the `builder` (the compression worker: re-plan for
the updated profile, sign the result as the class's next artifact). With `mode = "auto"` the new artifact's
rollout starts at once; with `"approve"` it waits for `edgefleet recompress approve ID`.

Debounce: one open recompression per class at a time, none while a rollout to the class is live, and none within
the policy's `cooldown_s` after the last one ended, so one problem yields one recompression.

Builds: by default `step` calls the builder inline (tests, one-shot tools). In the controller process a
`RecompressionRunner` (controller/recompress/runner.py) sets `submit`: `step` then hands each recompression in
`building` to that worker thread and returns at once, and the worker records the result (`run_build`).

Restart: a controller killed during a build leaves its recompression in `building`. When a build begins,
`begin_build` marks its row (in `note`); `recover` (called by the runner when it starts) retries such a build once,
noting why in `note` and the audit log; a recompression whose retried build had begun again when the controller
stopped is marked failed ("the controller stopped twice during this build"), so a build that kills its controller
cannot loop. Rows in `building` whose build never began (only one build runs at a time) just wait for their turn.
Its trigger fires again after the cooldown if the problem persists.

Example::

    loop = RecompressionLoop(db, builder=my_worker)
    loop.set_policy("rpi4", load_policy(Path("deploy/profiles/rpi4.toml")))
    loop.step()
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import profile_of
from edgefleet.controller.data.states import OPEN_RECOMPRESSION_STATES, RecompressionState, RolloutState
from edgefleet.controller.data.tables import (
    Artifact,
    AuditEntry,
    ClassPolicy,
    DeviceClass,
    Recompression,
    Rollout,
    utcnow,
)
from edgefleet.controller.errors import ConflictError, ControllerError, DatabaseUnavailableError, NotFoundError
from edgefleet.controller.recompress.policy import RecompressionPolicy, Trigger, detect
from edgefleet.controller.rollout.api import Rollouts, class_current_version
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.protocols.profile import DeviceProfile

__all__ = ["BuildRequest", "BuildResult", "Builder", "RecompressionLoop"]

log = logging.getLogger(__name__)

RESTART_NOTE = "retrying: the controller stopped during this build"
BUILD_STARTED = "building since"  # the note of a row whose build began
RETRY_STARTED = "; building again since"  # appended to RESTART_NOTE when the retried build begins
LIVE_ROLLOUTS = (RolloutState.PENDING.value, RolloutState.RUNNING.value, RolloutState.PAUSED.value)


@dataclasses.dataclass(frozen=True, slots=True)
class BuildRequest:
    """What the compression worker gets: the class's (updated) profile, the model, why."""

    recompression_id: int
    class_name: str
    model_name: str
    profile: DeviceProfile
    from_artifact_id: int
    trigger: str
    evidence: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class BuildResult:
    """The new artifact (already signed and recorded for the class) and the planner's report."""

    artifact_id: int
    report: dict[str, Any]


Builder = Callable[[BuildRequest], BuildResult]


class RecompressionLoop:
    def __init__(
        self,
        db: Database,
        *,
        builder: Builder | None = None,
        actor: str = "controller",
        plan: WavePlan | None = None,
        gates: GateConfig | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.db = db
        self.builder = builder
        self.actor = actor
        self.plan = plan or WavePlan()
        self.gates = gates or GateConfig()
        self.clock = clock
        # Set by a RecompressionRunner: takes a build request for its worker thread; False when busy (asked again
        # at the next step). None: `step` builds inline.
        self.submit: Callable[[BuildRequest], bool] | None = None

    def _audit(self, session: Session, action: str, target: str, now: dt.datetime, **detail: Any) -> None:
        session.add(
            AuditEntry(
                at=now, actor=self.actor, action=action, target=target, detail_json=json.dumps(detail, default=str)
            )
        )

    # ------------------------------------------------------------------ policies
    def set_policy(self, class_name: str, policy: RecompressionPolicy) -> None:
        now = self.clock()
        with self.db.transaction(f"setting the recompression policy of {class_name}") as session:
            if session.get(DeviceClass, class_name) is None:
                raise NotFoundError(f"device class {class_name!r} does not exist (see `edgefleet class list`)")
            row = session.get(ClassPolicy, class_name) or ClassPolicy(class_name=class_name)
            row.policy_json, row.updated_at = policy.model_dump_json(), now
            session.add(row)
            self._audit(session, "recompress.policy", class_name, now, policy=policy.model_dump())

    def policies(self) -> dict[str, RecompressionPolicy]:
        """The stored policy of every class that has one (the classes the loop watches)."""
        with self.db.reading("listing recompression policies") as session:
            rows = session.exec(select(ClassPolicy).order_by(col(ClassPolicy.class_name))).all()
        return {r.class_name: RecompressionPolicy.model_validate_json(r.policy_json) for r in rows}

    def describe_policies(self) -> str:
        """One line for logs: `rpi4 (approve, K=3), x86-gateway (auto, K=3)`, or `none`."""
        found = self.policies()
        parts = [f"{name} ({p.mode}, K={p.latency_windows})" for name, p in found.items()]
        return ", ".join(parts) or "none (no class has a [policy] table)"

    # ------------------------------------------------------------------ the loop
    def step(self, now: dt.datetime | None = None) -> list[int]:
        """Check every class with a policy, build what was triggered, follow rollouts; returns new recompressions."""
        now = now or self.clock()
        with self.db.reading("listing recompression policies") as session:
            classes = list(session.exec(select(ClassPolicy.class_name)).all())
        created = []
        for class_name in classes:
            try:
                found = self._check(class_name, now)
            except ControllerError as exc:
                log.warning("recompression check of %s failed, retrying next step: %s", class_name, exc)
                continue
            if found is not None:
                created.append(found)
        self._build(now)
        with self.db.reading("listing approved recompressions") as session:
            waiting = session.exec(
                select(Recompression.id).where(
                    Recompression.state == RecompressionState.PENDING.value, Recompression.mode == "auto"
                )
            ).all()
        for recompression_id in waiting:
            if recompression_id is not None:
                self._auto_approve(recompression_id)
        self._follow(now)
        return created

    def _check(self, class_name: str, now: dt.datetime) -> int | None:
        with self.db.transaction(f"checking class {class_name} for recompression") as session:
            class_row = session.get(DeviceClass, class_name, with_for_update=True)
            policy_row = session.get(ClassPolicy, class_name)
            if class_row is None or policy_row is None or self._debounced(session, class_name, policy_row, now):
                return None
            version = class_current_version(session, class_name)
            artifact = session.exec(
                select(Artifact).where(Artifact.class_name == class_name, Artifact.version == version)
            ).first()
            if artifact is None or artifact.id is None:
                return None
            policy = RecompressionPolicy.model_validate_json(policy_row.policy_json)
            trigger = detect(session, artifact=artifact, profile=profile_of(class_row), policy=policy, now=now)
            if trigger is None:
                return None
            return self._record(session, class_row, artifact, trigger, policy=policy, now=now)

    @staticmethod
    def _debounced(session: Session, class_name: str, policy_row: ClassPolicy, now: dt.datetime) -> bool:
        policy = RecompressionPolicy.model_validate_json(policy_row.policy_json)
        recent = session.exec(
            select(Recompression).where(Recompression.class_name == class_name).order_by(col(Recompression.id).desc())
        ).first()
        if recent is not None and (
            recent.state in OPEN_RECOMPRESSION_STATES
            or (recent.finished_at is not None and (now - recent.finished_at).total_seconds() < policy.cooldown_s)
        ):
            return True
        live = session.exec(
            select(Rollout.id).where(Rollout.class_name == class_name, col(Rollout.state).in_(LIVE_ROLLOUTS))
        ).first()
        return live is not None

    def _record(
        self,
        session: Session,
        class_row: DeviceClass,
        artifact: Artifact,
        trigger: Trigger,
        *,
        policy: RecompressionPolicy,
        now: dt.datetime,
    ) -> int:
        row = Recompression(
            class_name=class_row.name,
            model_name=artifact.model_name,
            from_artifact_id=artifact.id or 0,
            trigger=trigger.kind,
            summary=trigger.summary,
            evidence_json=json.dumps(trigger.evidence, default=str),
            state=RecompressionState.BUILDING.value,
            mode=policy.mode,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        self._audit(session, "recompress.trigger", class_row.name, now, id=row.id, trigger=trigger.kind,
                    summary=trigger.summary, evidence=trigger.evidence)  # fmt: skip
        if trigger.speed_correction is not None:
            profile = profile_of(class_row)
            updated = profile.model_copy(update={"speed_correction": round(trigger.speed_correction, 3)})
            class_row.profile_json = updated.model_dump_json()
            session.add(class_row)
            self._audit(session, "class.profile.update", class_row.name, now,
                        speed_correction=updated.speed_correction, was=profile.speed_correction,
                        recompression=row.id)  # fmt: skip
        log.info("class %s: recompression %s triggered: %s", class_row.name, row.id, trigger.summary)
        assert row.id is not None  # noqa: S101 - flushed
        return row.id

    def _build(self, now: dt.datetime) -> None:
        with self.db.reading("listing recompressions to build") as session:
            todo = list(
                session.exec(
                    select(Recompression).where(Recompression.state == RecompressionState.BUILDING.value)
                ).all()
            )
            requests = []
            for row in todo:
                class_row = session.get(DeviceClass, row.class_name)
                if class_row is not None and row.id is not None:
                    requests.append(
                        BuildRequest(row.id, row.class_name, row.model_name, profile_of(class_row),
                                     row.from_artifact_id, row.trigger, json.loads(row.evidence_json))
                    )  # fmt: skip
        for request in requests:
            if self.builder is None:
                self._finish(
                    request.recompression_id,
                    RecompressionState.FAILED.value,
                    now,
                    note="no compression worker is attached",
                )
            elif self.submit is not None:
                self.submit(request)
            else:
                self.run_build(request, now)

    def run_build(self, request: BuildRequest, now: dt.datetime | None = None) -> None:
        """Build one recompression and record the result (pending, then rolling out in auto mode) or the failure."""
        if self.builder is None:
            self.fail(request.recompression_id, "no compression worker is attached", now)
            return
        if not self.begin_build(request.recompression_id, now):
            return
        try:
            result = self.builder(request)
        except Exception as exc:  # the worker runs torch: any failure ends this recompression, not the loop
            if isinstance(exc, ControllerError):  # an expected refusal (no key, no model): no traceback
                log.warning("recompression %s: the build failed: %s", request.recompression_id, exc)
            else:
                log.exception("recompression %s: the build failed", request.recompression_id)
            self.fail(request.recompression_id, f"build failed: {exc}", now)
            return
        self.record_build(request.recompression_id, result, now)

    def record_build(self, recompression_id: int, result: BuildResult, now: dt.datetime | None = None) -> None:
        """The builder's artifact: the recompression becomes pending (rolling out at once in auto mode)."""
        self._built(recompression_id, result, now or self.clock())

    def fail(self, recompression_id: int, note: str, now: dt.datetime | None = None) -> None:
        """End a recompression that is still building as failed, with the reason."""
        self._finish(recompression_id, RecompressionState.FAILED.value, now or self.clock(), note=note)

    def begin_build(self, recompression_id: int, now: dt.datetime | None = None) -> bool:
        """Mark the row's build as begun (what `recover` goes by); False when it is no longer building."""
        now = now or self.clock()
        with self.db.transaction(f"starting the build of recompression {recompression_id}") as session:
            row = session.get(Recompression, recompression_id, with_for_update=True)
            if (
                row is None or row.state != RecompressionState.BUILDING.value
            ):  # recorded or rejected since it was listed
                return False
            if row.note is not None and row.note.startswith(RESTART_NOTE):
                if RETRY_STARTED not in row.note:
                    row.note = f"{row.note}{RETRY_STARTED} {now.isoformat()}"
            else:
                row.note = f"{BUILD_STARTED} {now.isoformat()}"
            row.updated_at = now
            session.add(row)
        return True

    def recover(self, now: dt.datetime | None = None) -> list[int]:
        """After a restart: retry each interrupted build once; fail one interrupted again. Returns retried.

        Only builds that began count (`begin_build`): a row still waiting for the build thread is left to it.
        """
        now = now or self.clock()
        retried = []
        with self.db.transaction("recovering interrupted recompression builds") as session:
            rows = session.exec(
                select(Recompression).where(Recompression.state == RecompressionState.BUILDING.value)
            ).all()
            for row in rows:
                note = row.note or ""
                if note.startswith(RESTART_NOTE) and RETRY_STARTED in note:
                    row.state, row.finished_at = RecompressionState.FAILED.value, now
                    row.note = "the controller stopped twice during this build; giving up (see the controller log)"
                    action = "recompress.failed"
                elif not note.startswith(BUILD_STARTED):
                    continue  # its build never began: it waits for its turn
                else:
                    row.note = f"{RESTART_NOTE} (found building at {now.isoformat()})"
                    action = "recompress.retry"
                    if row.id is not None:
                        retried.append(row.id)
                row.updated_at = now
                session.add(row)
                self._audit(session, action, row.class_name, now, id=row.id, note=row.note)
                log.warning("recompression %s of class %s: %s", row.id, row.class_name, row.note)
        return retried

    def _built(self, recompression_id: int, result: BuildResult, now: dt.datetime) -> None:
        with self.db.transaction(f"recording the build of recompression {recompression_id}") as session:
            row = session.get(Recompression, recompression_id, with_for_update=True)
            if row is None or row.state != RecompressionState.BUILDING.value:
                return
            row.artifact_id, row.report_json = result.artifact_id, json.dumps(result.report, default=str)
            row.state, row.updated_at = RecompressionState.PENDING.value, now
            if row.note is not None and row.note.startswith(BUILD_STARTED):
                row.note = None  # the build is over; a retry's note stays (why it was built twice)
            session.add(row)
            self._audit(session, "recompress.built", row.class_name, now, id=row.id, artifact=result.artifact_id)
        if row.mode == "auto":
            self._auto_approve(recompression_id)

    def _auto_approve(self, recompression_id: int) -> None:
        try:
            self.approve(recompression_id, actor=f"{self.actor} (policy: auto)")
        except (ConflictError, DatabaseUnavailableError) as exc:  # a live rollout to the class, a busy database
            log.warning("recompression %s: cannot start its rollout yet: %s", recompression_id, exc)
        except ControllerError as exc:  # e.g. no device of the class matches: retrying cannot help
            log.warning("recompression %s: cannot start its rollout: %s", recompression_id, exc)
            self._finish(
                recompression_id,
                RecompressionState.FAILED.value,
                self.clock(),
                note=f"rollout not started: {exc}",
                states=(RecompressionState.PENDING.value,),
            )

    def _follow(self, now: dt.datetime) -> None:
        with self.db.transaction("following recompression rollouts") as session:
            rows = session.exec(
                select(Recompression).where(Recompression.state == RecompressionState.ROLLING_OUT.value)
            ).all()
            for row in rows:
                rollout = session.get(Rollout, row.rollout_id) if row.rollout_id is not None else None
                if rollout is None or rollout.state in LIVE_ROLLOUTS:
                    continue
                row.state = (
                    RecompressionState.DONE.value
                    if rollout.state == RolloutState.COMPLETED
                    else RecompressionState.FAILED.value
                )
                row.note = f"rollout {rollout.id} {rollout.state}"
                row.updated_at = row.finished_at = now
                session.add(row)

    def _finish(
        self,
        recompression_id: int,
        state: str,
        now: dt.datetime,
        *,
        note: str,
        states: tuple[str, ...] = (RecompressionState.BUILDING.value,),
    ) -> None:
        with self.db.transaction(f"ending recompression {recompression_id}") as session:
            row = session.get(Recompression, recompression_id, with_for_update=True)
            if row is None or row.state not in states:  # e.g. rejected while it was building
                return
            row.state, row.note, row.updated_at, row.finished_at = state, note, now, now
            session.add(row)
            self._audit(session, f"recompress.{state}", row.class_name, now, id=row.id, note=note)

    # ------------------------------------------------------------------ operator decisions
    def approve(self, recompression_id: int, *, actor: str | None = None) -> Recompression:
        """Start the gated rollout of the new artifact.

        One transaction: the row is claimed (pending -> rolling_out by a conditional UPDATE, which locks it on
        PostgreSQL and takes the write lock on SQLite), the rollout is started, and both commit or neither does.
        So the build thread and the timer approving at once start one rollout, and a concurrent reject wins or loses
        as a whole.
        """
        now = self.clock()
        with self.db.transaction(f"approving recompression {recompression_id}") as session:
            claimed = session.execute(
                sa.update(Recompression)
                .where(
                    col(Recompression.id) == recompression_id,
                    col(Recompression.state) == RecompressionState.PENDING.value,
                    col(Recompression.artifact_id).is_not(None),
                )
                .values(state=RecompressionState.ROLLING_OUT.value, decided_by=actor or self.actor, updated_at=now)
            )
            stored = session.get(Recompression, recompression_id, populate_existing=True)
            if stored is None:
                raise NotFoundError(
                    f"recompression {recompression_id} does not exist (see `edgefleet recompress list`)"
                )
            if getattr(claimed, "rowcount", 0) != 1 or stored.artifact_id is None:
                raise ConflictError(
                    f"recompression {recompression_id} is {stored.state}; only a pending one can be approved"
                )
            rollout = Rollouts(self.db, actor=actor or self.actor, clock=self.clock)._start(
                session, stored.artifact_id, plan=self.plan, gates=self.gates, on_breach="abort"
            )
            stored.rollout_id = rollout.id
            session.add(stored)
            self._audit(session, "recompress.approve", stored.class_name, now, id=stored.id, rollout=rollout.id)
        return stored

    def reject(self, recompression_id: int, *, reason: str, actor: str | None = None) -> Recompression:
        now = self.clock()
        with self.db.transaction(f"rejecting recompression {recompression_id}") as session:
            row = session.get(Recompression, recompression_id, with_for_update=True)
            if row is None:
                raise NotFoundError(
                    f"recompression {recompression_id} does not exist (see `edgefleet recompress list`)"
                )
            if row.state not in {RecompressionState.BUILDING.value, RecompressionState.PENDING.value}:
                raise ConflictError(f"recompression {recompression_id} is {row.state}; it can no longer be rejected")
            row.state, row.note, row.decided_by = RecompressionState.REJECTED.value, reason, actor or self.actor
            row.updated_at = row.finished_at = now
            session.add(row)
            self._audit(session, "recompress.reject", row.class_name, now, id=row.id, reason=reason)
        return row

    def get(self, recompression_id: int) -> Recompression:
        with self.db.reading(f"reading recompression {recompression_id}") as session:
            row = session.get(Recompression, recompression_id)
        if row is None:
            raise NotFoundError(f"recompression {recompression_id} does not exist (see `edgefleet recompress list`)")
        return row

    def list(self, *, limit: int = 100) -> list[Recompression]:
        with self.db.reading("listing recompressions") as session:
            query = select(Recompression).order_by(col(Recompression.id).desc()).limit(limit)
            return list(session.exec(query).all())
