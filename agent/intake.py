"""Taking commands in: new jobs, repeated job ids (answered, not redone), busy refusals, rollbacks, configure.

Every move still goes through `Updater.move`, so the transition table stays the one place that changes state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefleet.agent.machine import TERMINAL, Event
from edgefleet.protocols.codes import JobState, ResultCode
from edgefleet.protocols.commands import ConfigureCommand, DeployCommand, RollbackCommand, check_fresh
from edgefleet.protocols.errors import VerificationError
from edgefleet.protocols.messages import JobEvent

if TYPE_CHECKING:
    from edgefleet.agent.updater import Updater

__all__ = ["handle_command", "refuse"]


def handle_command(up: Updater, command: DeployCommand | RollbackCommand | ConfigureCommand) -> None:
    rec = up.record
    if command.job_id == rec.job_id or command.job_id in rec.recent:
        _answer_known(up, command.job_id)
        return
    if isinstance(command, ConfigureCommand):
        if command.probation_s is not None:
            up.probation_s = command.probation_s
        up.host.configure(command)
        up.report(job_id=command.job_id)
        return
    if rec.state not in TERMINAL:
        refuse(up, command.job_id, ResultCode.BUSY, f"job {rec.job_id} is {rec.state.value}; retry later")
        return
    manifest = command.manifest
    if isinstance(command, RollbackCommand) and manifest is None:
        _slot_rollback(up, command)
        return
    if manifest is None:  # pragma: no cover - a DeployCommand always carries one
        return
    up.start_job(command.job_id, manifest, rollback=isinstance(command, RollbackCommand))
    try:
        check_fresh(command, now=up.wall())
    except VerificationError as exc:
        up.move(Event.FAIL, result=exc.result_code, detail=str(exc))
        return
    up.move(Event.DEPLOY)


def _answer_known(up: Updater, job_id: str) -> None:
    if job_id == up.record.job_id:
        up.report()
        return
    state, result = up.record.recent[job_id]
    refuse(up, job_id, ResultCode(result), "already done", state=JobState(state))


def refuse(up: Updater, job_id: str, code: ResultCode, detail: str, *, state: JobState = JobState.FAILED) -> None:
    """Answer a command without touching the current job."""
    current = up.slots.current()
    up.host.publish_event(
        JobEvent(
            job_id=job_id,
            state=state,
            result=code,
            detail=detail,
            timestamp=up.wall(),
            model_version=current.version if current else None,
        )
    )


def _slot_rollback(up: Updater, command: RollbackCommand) -> None:
    """An explicit rollback without a manifest: switch back to the previous slot."""
    previous = up.slots.previous()
    if previous is None or command.target_version not in {None, previous.version}:
        refuse(up, command.job_id, ResultCode.UNSUPPORTED, "no previous model of that version to go back to")
        return
    rec = up.record
    rec.job_id, rec.manifest, rec.rollback, rec.moves = command.job_id, None, True, 0
    rec.result, rec.detail = 0, ""
    rec.target_slot = up.slots.current_name()
    up.move(Event.ROLLBACK)
