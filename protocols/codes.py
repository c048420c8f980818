"""Numeric result codes and job states that devices report, in the spirit of the LwM2M firmware object (0 = ok)."""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["JobState", "ResultCode"]


class ResultCode(IntEnum):
    """Why a job ended the way it did; sent as a plain integer in `JobEvent.result`.

    LwM2M's firmware object numbers its results from 1 = success; here 0 is ok so that "no error" is falsy.
    Codes are append-only: a number never changes meaning. A reader that does not know a number (an older
    controller) rejects the event as any message that does not parse: counted, dropped, never a crash.

    `NO_PREVIOUS_MODEL` (18) answers a rollback with nothing to go back to (a device's first model, or a previous
    slot without the version asked for): the job fails and the device keeps running the model it has.
    """

    OK = 0
    NO_STORAGE = 1
    OUT_OF_MEMORY = 2
    CONNECTION_LOST = 3
    INTEGRITY_FAILURE = 4
    UNSUPPORTED = 5
    VALIDATION_FAILED = 6
    EXPIRED = 7
    DOWNGRADE_REFUSED = 8
    SIGNATURE_INVALID = 9
    UNKNOWN_KEY = 10
    INSTALL_FAILED = 11
    PROBATION_FAILED = 12
    CANCELLED = 13
    BUSY = 14
    INVALID_MESSAGE = 15
    TIMEOUT = 16
    INTERNAL_ERROR = 17
    NO_PREVIOUS_MODEL = 18


class JobState(StrEnum):
    """Where a device is in one update: `idle → downloading → verifying → installing → validating → active`.

    `failed` and `rolled_back` are the exits; the device's state machine owns the transitions.
    """

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    VALIDATING = "validating"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
