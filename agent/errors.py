"""The agent's one error hierarchy: everything the agent raises on purpose is an `AgentError`."""

from __future__ import annotations

import errno

from edgefleet.protocols.codes import ResultCode

__all__ = [
    "AgentError",
    "InferenceError",
    "SlotError",
    "StateError",
    "TransferError",
    "TransitionError",
    "storage_code",
]

# A full, over-quota, read-only or too-small file system: the device cannot store the model.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


class AgentError(RuntimeError):
    """Something on the device side went wrong; the message says what and what to do about it."""


class StateError(AgentError):
    """The persisted update state could not be read or written (disk full, corrupt file...)."""


class TransitionError(AgentError):
    """An event arrived that the update state machine has no row for, or the machine looped."""


class SlotError(AgentError):
    """A model slot could not be prepared or switched."""


class InferenceError(AgentError):
    """The model could not be loaded or could not run on this input."""


class TransferError(AgentError):
    """An artifact transfer failed; `artifact` and `block` (when known) name where."""

    def __init__(self, message: str, *, artifact: str, block: int | None = None) -> None:
        super().__init__(message)
        self.artifact = artifact
        self.block = block


def storage_code(exc: BaseException, *, otherwise: ResultCode = ResultCode.INSTALL_FAILED) -> ResultCode:
    """`NO_STORAGE` when `exc` (or what caused it) is an OSError of the storage: full, over quota, read-only, or
    failing (EIO); `otherwise` for anything else."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and (seen.errno in _NO_SPACE or seen.errno == errno.EIO):
            return ResultCode.NO_STORAGE
        seen = seen.__cause__ or seen.__context__
    return otherwise
