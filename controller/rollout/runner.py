"""A background thread that calls `RolloutEngine.tick()` every `interval_s`, for the controller process.

A tick that fails (a bug, a database error the engine did not expect) is logged and the loop goes on: the next
tick starts again from what the database holds.

Example::

    runner = RolloutRunner(RolloutEngine(db, publisher=mqtt), interval_s=1.0)
    runner.start()
    ...
    runner.stop()
"""

from __future__ import annotations

from edgefleet.controller.periodic import Periodic
from edgefleet.controller.rollout.engine import RolloutEngine

__all__ = ["RolloutRunner"]


class RolloutRunner:
    """Ticks the engine on its own thread; `wake()` asks for a tick now (e.g. after a device came online)."""

    def __init__(self, engine: RolloutEngine, *, interval_s: float = 1.0) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._periodic = Periodic(engine.tick, interval_s=interval_s, name="edgefleet-rollouts")

    @property
    def ticks(self) -> int:
        return self._periodic.steps

    @property
    def failures(self) -> int:
        return self._periodic.failures

    def start(self) -> None:
        self._periodic.start()

    def wake(self) -> None:
        self._periodic.wake()

    def stop(self, *, timeout: float = 10.0) -> None:
        self._periodic.stop(timeout=timeout)
