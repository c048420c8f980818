"""Every state the controller stores, in one place: rollouts, a device's row in a rollout, deployment jobs, and
recompressions (the device's own update states are `protocols.codes.JobState`; its transitions live in
agent/machine.py).

A state is a `StrEnum`, so it compares equal to the text stored in the database and to what `--json` prints.
Who moves which state: the rollout API (start/pause/resume/abort) and the engine (`rollout/`) move rollouts and rows,
`rollout/sync.py` moves rows from their jobs' outcomes, the service (`service/state_updates.py`) moves jobs from the
devices' events, and the recompression loop (`recompress/loop.py`) moves recompressions.

Example::

    if rollout.state in FINAL_ROLLOUT_STATES: ...
    row.state = RowState.NO_PREVIOUS_MODEL
"""

from __future__ import annotations

from enum import StrEnum

from edgefleet.protocols.codes import JobState

__all__ = [
    "ACTIVE_ROW_STATES",
    "DONE_ROW_STATES",
    "FINAL_JOB_STATES",
    "FINAL_ROLLOUT_STATES",
    "FINAL_ROW_STATES",
    "LIVE_ROLLOUT_STATES",
    "OPEN_RECOMPRESSION_STATES",
    "JobRecordState",
    "RecompressionState",
    "RolloutState",
    "RowState",
]


class RolloutState(StrEnum):
    """A rollout's state; `pending` until the engine's first step, `aborted` and `completed` are final."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"


FINAL_ROLLOUT_STATES = frozenset({RolloutState.ABORTED, RolloutState.COMPLETED})
LIVE_ROLLOUT_STATES = (RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED)


class RowState(StrEnum):
    """A device's state in one rollout (`rollout_devices.state`)."""

    PENDING = "pending"  # in a wave, no job yet
    IN_PROGRESS = "in_progress"  # deploy job created (queued or sent), not final
    ACTIVE = "active"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLED_BACK = "rolled_back"  # the device went back: its probation failed, or our rollback did it
    CANCELLED = "cancelled"  # never sent: the rollout was aborted first
    ROLLBACK_PENDING = "rollback_pending"  # the rollout was aborted; a rollback job is to be sent
    ROLLING_BACK = "rolling_back"
    ROLLBACK_FAILED = "rollback_failed"
    # The rollout was aborted but the device had no model before it (or its previous slot is gone): there is
    # nothing to go back to, so it keeps running the rollout's model. Final; `detail` says which version it keeps.
    NO_PREVIOUS_MODEL = "no_previous_model"


FINAL_ROW_STATES = frozenset(
    {RowState.ACTIVE, RowState.FAILED, RowState.TIMED_OUT, RowState.ROLLED_BACK, RowState.CANCELLED,
     RowState.ROLLBACK_FAILED, RowState.NO_PREVIOUS_MODEL}
)  # fmt: skip
# A wave is done when each of its devices reached one of these (the deploy job ended, one way or the other).
DONE_ROW_STATES = frozenset({RowState.ACTIVE, RowState.FAILED, RowState.TIMED_OUT, RowState.ROLLED_BACK})
ACTIVE_ROW_STATES = frozenset(
    {RowState.PENDING, RowState.IN_PROGRESS, RowState.ROLLBACK_PENDING, RowState.ROLLING_BACK}
)


class JobRecordState(StrEnum):
    """A deployment job's state before the device answers (`deployment_jobs.state`); after that it holds the
    device's own `JobState` (downloading, ..., active, failed, rolled_back)."""

    QUEUED = "queued"  # recorded, not yet published (the outbox)
    SENT = "sent"  # published; no answer from the device yet


FINAL_JOB_STATES = frozenset({JobState.ACTIVE.value, JobState.FAILED.value, JobState.ROLLED_BACK.value})


class RecompressionState(StrEnum):
    """A recompression's state (`recompressions.state`): building -> pending (approval) -> rolling_out -> done."""

    BUILDING = "building"
    PENDING = "pending"  # built and signed, waiting for an operator's approval (or an automatic one)
    ROLLING_OUT = "rolling_out"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


OPEN_RECOMPRESSION_STATES = (RecompressionState.BUILDING, RecompressionState.PENDING, RecompressionState.ROLLING_OUT)
