"""Bringing a rollout's device rows up to date from their jobs, in the caller's transaction.

A deploy job that ended moves its row to active, failed or rolled_back; one that stayed silent past the rollout's
device timeout becomes `timed_out` (and its job `failed` with result `timeout`, so no job is left hanging). In an
aborted rollout a device that became active is queued for a rollback; a rollback job ends the row as rolled_back,
rollback_failed, or no_previous_model (the device answered that it has nothing to go back to and keeps its model).
"""

from __future__ import annotations

import datetime as dt

from sqlmodel import Session, col, select

from edgefleet.controller.data.states import RolloutState, RowState
from edgefleet.controller.data.tables import Artifact, DeploymentJob, Rollout, RolloutDevice
from edgefleet.controller.rollout.plan import WavePlan
from edgefleet.protocols.codes import JobState, ResultCode

__all__ = ["sync_rows"]

_ACTIVE, _FAILED, _ROLLED_BACK = JobState.ACTIVE.value, JobState.FAILED.value, JobState.ROLLED_BACK.value
_NO_PREVIOUS_MODEL = ResultCode.NO_PREVIOUS_MODEL.name.lower()


def sync_rows(session: Session, rollout_id: int, *, now: dt.datetime) -> int:
    """Update the rollout's rows that wait on a job; returns how many changed."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        return 0
    timeout = dt.timedelta(seconds=WavePlan.model_validate_json(rollout.plan_json).device_timeout_s)
    watched = [RowState.IN_PROGRESS.value, RowState.ROLLING_BACK.value]
    if rollout.state != RolloutState.COMPLETED:
        watched.append(RowState.ACTIVE.value)  # probation may still roll an active device back
    rows = list(
        session.exec(
            select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id, col(RolloutDevice.state).in_(watched))
        ).all()
    )
    job_ids = [j for r in rows for j in (r.job_id, r.rollback_job_id) if j is not None]
    jobs = {j.id: j for j in session.exec(select(DeploymentJob).where(col(DeploymentJob.id).in_(job_ids))).all()}
    aborted = rollout.state == RolloutState.ABORTED
    artifact = session.get(Artifact, rollout.artifact_id)
    keeps = f"v{artifact.version}" if artifact is not None else "the rollout's model"  # a rolling-back row ran it
    changed = 0
    for row in rows:
        before = row.state
        if row.state == RowState.ROLLING_BACK:
            _sync_rollback(row, jobs.get(row.rollback_job_id or ""), now=now, timeout=timeout, keeps=keeps)
        else:
            _sync_deploy(row, jobs.get(row.job_id or ""), now=now, timeout=timeout, aborted=aborted)
        if row.state != before:
            session.add(row)
            changed += 1
    return changed  # the jobs changed by a timeout are in the session: they commit with the rows


def _timed_out(row: RolloutDevice, job: DeploymentJob, *, now: dt.datetime, timeout: dt.timedelta) -> bool:
    if row.sent_at is None or now - row.sent_at <= timeout:
        return False
    job.state, job.result_code, job.updated_at, job.finished_at = _FAILED, "timeout", now, now
    job.detail = f"no answer from the device within {timeout.total_seconds():g}s"
    return True


_DETAIL_CHARS = 300


def _why(job: DeploymentJob) -> str | None:
    """The job's result and, where the device said more, its words: "unknown_key: signed by key 1e3d..., ..."."""
    if not job.detail:
        return job.result_code
    return f"{job.result_code}: {job.detail[:_DETAIL_CHARS]}" if job.result_code else job.detail[:_DETAIL_CHARS]


def _sync_deploy(
    row: RolloutDevice, job: DeploymentJob | None, *, now: dt.datetime, timeout: dt.timedelta, aborted: bool
) -> None:
    if job is None:
        row.state, row.finished_at, row.detail = RowState.FAILED.value, now, "its job disappeared"
        return
    if row.state == RowState.ACTIVE:
        if job.state == _ROLLED_BACK:
            row.state, row.finished_at, row.detail = RowState.ROLLED_BACK.value, now, _why(job)
        elif aborted:
            row.state = RowState.ROLLBACK_PENDING.value
        return
    if job.state == _ACTIVE:
        row.state, row.finished_at = RowState.ACTIVE.value, job.finished_at or now
        if aborted:
            row.state = RowState.ROLLBACK_PENDING.value
    elif job.state == _FAILED:
        row.state, row.finished_at, row.detail = RowState.FAILED.value, job.finished_at or now, _why(job)
    elif job.state == _ROLLED_BACK:
        row.state, row.finished_at, row.detail = RowState.ROLLED_BACK.value, job.finished_at or now, _why(job)
    elif _timed_out(row, job, now=now, timeout=timeout):
        row.state, row.finished_at, row.detail = RowState.TIMED_OUT.value, now, "silent past the device timeout"


def _sync_rollback(
    row: RolloutDevice, job: DeploymentJob | None, *, now: dt.datetime, timeout: dt.timedelta, keeps: str
) -> None:
    if job is None:
        row.state, row.finished_at, row.detail = RowState.ROLLBACK_FAILED.value, now, "its rollback job disappeared"
    elif job.state in {_ROLLED_BACK, _ACTIVE}:
        row.state, row.finished_at, row.detail = RowState.ROLLED_BACK.value, job.finished_at or now, "rolled back"
    elif job.state == _FAILED and job.result_code == _NO_PREVIOUS_MODEL:
        # the device had nothing to go back to and keeps the model it runs (its words are the job's detail)
        row.state, row.finished_at = RowState.NO_PREVIOUS_MODEL.value, job.finished_at or now
        row.detail = f"no previous model: the device keeps {keeps}" + (f" ({job.detail})" if job.detail else "")
    elif job.state == _FAILED:
        row.state, row.finished_at, row.detail = RowState.ROLLBACK_FAILED.value, now, _why(job)
    elif _timed_out(row, job, now=now, timeout=timeout):
        row.state, row.finished_at, row.detail = RowState.ROLLBACK_FAILED.value, now, "rollback timed out"
