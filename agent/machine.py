"""The update state machine: every allowed move is one row of `TRANSITIONS`, (state, event) -> state.

Kept as one table in one module, the way Mender's client keeps its `AddTransition` rows together, so a reader
sees every path an update can take in one screen::

    idle -> downloading -> verifying -> installing -> validating -> active
                 \\              \\            \\            \\          \\ (probation breach, rollback command)
                  +--------------+------------+--> failed    +----------+--> rolling_back -> rolled_back

Failures before activation (download, verification, install) go to `failed` and never touch the running model.
A validation or probation failure goes through `rolling_back`; rollback states never fail outward: a failure
while rolling back still ends in `rolled_back`. A per-job move counter catches loops (a resume that crashes
again and again ends the job instead of cycling forever).
"""

from __future__ import annotations

import enum

from edgefleet.agent.errors import TransitionError

__all__ = [
    "MAX_MOVES_PER_JOB",
    "TERMINAL",
    "TRANSITIONS",
    "Event",
    "State",
    "next_state",
]


class State(enum.StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    VALIDATING = "validating"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class Event(enum.StrEnum):
    DEPLOY = "deploy"  # a new, not yet seen job arrived
    RESUME = "resume"  # the agent restarted in this state and picks it up again
    DOWNLOADED = "downloaded"  # every block is on disk and matched its hash
    VERIFIED = "verified"  # signature, digest, version, expiry and capabilities all hold
    INSTALLED = "installed"  # the artifact sits complete in the inactive slot
    VALIDATED = "validated"  # validation samples within tolerance, latency within budget; slot switched
    PROBATION_PASSED = "probation_passed"  # the window after activation ended quietly
    FAIL = "fail"  # any step failed; the job's result code says why
    ROLLBACK = "rollback"  # an explicit, signed rollback command, or a probation breach
    ROLLED_BACK = "rolled_back"  # the previous slot is active again


S, E = State, Event

#: Every allowed move. Anything not listed is refused with `TransitionError`.
TRANSITIONS: dict[tuple[State, Event], State] = {
    # a new job may start from any resting state
    (S.IDLE, E.DEPLOY): S.DOWNLOADING,
    (S.ACTIVE, E.DEPLOY): S.DOWNLOADING,
    (S.FAILED, E.DEPLOY): S.DOWNLOADING,
    (S.ROLLED_BACK, E.DEPLOY): S.DOWNLOADING,
    # the happy path
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.VERIFYING, E.VERIFIED): S.INSTALLING,
    (S.INSTALLING, E.INSTALLED): S.VALIDATING,
    (S.VALIDATING, E.VALIDATED): S.ACTIVE,
    (S.ACTIVE, E.PROBATION_PASSED): S.ACTIVE,
    # after a restart: each step is idempotent, so it simply runs again
    (S.DOWNLOADING, E.RESUME): S.DOWNLOADING,
    (S.VERIFYING, E.RESUME): S.VERIFYING,
    (S.INSTALLING, E.RESUME): S.INSTALLING,
    (S.VALIDATING, E.RESUME): S.VALIDATING,
    (S.ROLLING_BACK, E.RESUME): S.ROLLING_BACK,
    # failures before activation leave the running model untouched
    (S.DOWNLOADING, E.FAIL): S.FAILED,
    (S.VERIFYING, E.FAIL): S.FAILED,
    (S.INSTALLING, E.FAIL): S.FAILED,
    # the new slot was prepared (validation) or is running (probation): go back through rolling_back
    (S.VALIDATING, E.FAIL): S.ROLLING_BACK,
    (S.ACTIVE, E.FAIL): S.ROLLING_BACK,
    (S.ACTIVE, E.ROLLBACK): S.ROLLING_BACK,
    (S.ROLLED_BACK, E.ROLLBACK): S.ROLLING_BACK,
    (S.FAILED, E.ROLLBACK): S.ROLLING_BACK,  # the last job failed, but the model before the current one remains
    # rollback never fails outward
    (S.ROLLING_BACK, E.ROLLED_BACK): S.ROLLED_BACK,
    (S.ROLLING_BACK, E.FAIL): S.ROLLED_BACK,
}

#: States in which no job is in progress.
TERMINAL = frozenset({S.IDLE, S.ACTIVE, S.FAILED, S.ROLLED_BACK})

#: More moves than this in one job means a loop (a resume that keeps crashing); the job is ended.
MAX_MOVES_PER_JOB = 32


def next_state(state: State, event: Event, *, moves: int = 0) -> State:
    """The state after `event` in `state`; raises `TransitionError` for a missing row or a loop."""
    target = TRANSITIONS.get((state, event))
    if target is None:
        raise TransitionError(f"no transition from {state.value!r} on {event.value!r}")
    if moves >= MAX_MOVES_PER_JOB and target not in TERMINAL and target is not S.ROLLING_BACK:
        raise TransitionError(
            f"job made {moves} moves (limit {MAX_MOVES_PER_JOB}); it is looping, ending it instead of {target.value}"
        )
    return target
