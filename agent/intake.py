"""Taking commands in: new jobs, repeated job ids (answered, not redone), busy refusals, rollbacks, configure.

Every move still goes through `Updater.move`, so the transition table stays the one place that changes state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edgefleet.agent.machine import TERMINAL, Event
from edgefleet.protocols.codes import JobState, ResultCode
from edgefleet.protocols.commands import ConfigureCommand, DeployCommand, RollbackCommand, check_fresh
from edgefleet.protocols.errors import VerificationError
from edgefleet.protocols.messages import JobEvent

if TYPE_CHECKING:
    from edgefleet.agent.slots import SlotInfo
    from edgefleet.agent.updater import Updater

__all__ = ["handle_command", "refuse"]

log = logging.getLogger(__name__)


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
    """An explicit rollback without a manifest: switch back to the previous slot.

    With nothing to go back to (a first model, or another version in the previous slot) the job fails with
    `no_previous_model` and the device keeps running what it runs: dropping the only model would leave it
    with none, which no rollback asks for.
    """
    previous = up.slots.previous()
    if previous is None or command.target_version not in {None, previous.version}:
        detail = _nothing_to_go_back_to(up, command, previous)
        log.info("device %s rollback %s: %s", up.config.device_id, command.job_id, detail)
        refuse(up, command.job_id, ResultCode.NO_PREVIOUS_MODEL, detail)
        return
    rec = up.record
    rec.job_id, rec.manifest, rec.rollback, rec.moves = command.job_id, None, True, 0
    rec.result, rec.detail = 0, ""
    rec.target_slot = up.slots.current_name()
    up.move(Event.ROLLBACK)


def _nothing_to_go_back_to(up: Updater, command: RollbackCommand, previous: SlotInfo | None) -> str:
    """Why a slot rollback cannot happen, and what the device runs instead, in words for the operator.

    e.g. "no previous model to go back to: v1 is the only model on this device; it keeps running it".
    The other slot is empty after a first install, and also after a failed install over the older model.
    """
    current = up.slots.current()
    if current is None:
        return "no previous model to go back to: this device runs no model"
    if previous is None:
        return (
            f"no previous model to go back to: v{current.version} is the only model on this device; it keeps running it"
        )
    return (
        f"no previous model of v{command.target_version} to go back to: the previous slot holds "
        f"v{previous.version}; this device keeps running v{current.version}"
    )
