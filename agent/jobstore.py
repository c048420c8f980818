"""The persisted record of the update in progress (and the last few finished jobs), written before acting.

One small JSON file per device, replaced atomically on every transition; on start the agent reads it to resume
or roll back. The signed manifest travels inside it, so a resumed job verifies against exactly what was sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgefleet.agent.errors import StateError
from edgefleet.agent.machine import State
from edgefleet.agent.persist import read_json, write_json

__all__ = ["JobRecord", "JobStore"]

RECENT_JOBS = 32


@dataclass(slots=True)
class JobRecord:
    state: State = State.IDLE
    job_id: str | None = None
    result: int = 0
    detail: str = ""
    moves: int = 0
    manifest: dict[str, Any] | None = None  # the SignedManifest as JSON
    rollback: bool = False  # explicit, signed rollback: a lower version is allowed
    target_slot: str | None = None
    probation_until: float | None = None  # wall-clock seconds
    clean_exit: bool = False
    recent: dict[str, list[Any]] = field(default_factory=dict)  # job id -> [state, result]

    def remember(self) -> None:
        """Note the current job's outcome so that a repeated command is answered, not redone."""
        if self.job_id is None:
            return
        self.recent[self.job_id] = [self.state.value, self.result]
        while len(self.recent) > RECENT_JOBS:
            del self.recent[next(iter(self.recent))]


class JobStore:
    __slots__ = ("durable", "path")

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable

    def load(self) -> JobRecord:
        raw = read_json(self.path)
        if raw is None:
            return JobRecord()
        if not isinstance(raw, dict):
            raise StateError(f"{self.path} does not hold a job record; delete it to start from idle")
        try:
            raw["state"] = State(raw.get("state", "idle"))
            return JobRecord(**raw)
        except (TypeError, ValueError) as exc:
            raise StateError(f"{self.path} holds an unreadable job record ({exc}); delete it to start idle") from exc

    def save(self, record: JobRecord) -> None:
        # a shallow dict: dataclasses.asdict would deep-copy the manifest on every transition
        data = {f.name: getattr(record, f.name) for f in fields(record)}
        data["state"] = record.state.value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, data, durable=self.durable)
