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

import logging
import threading

from edgefleet.controller.rollout.engine import RolloutEngine

__all__ = ["RolloutRunner"]

log = logging.getLogger(__name__)


class RolloutRunner:
    """Ticks the engine on its own thread; `wake()` asks for a tick now (e.g. after a device came online)."""

    def __init__(self, engine: RolloutEngine, *, interval_s: float = 1.0) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.ticks = 0
        self.failures = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-rollouts", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.engine.tick()
                self.ticks += 1
            except Exception:  # the loop must outlive one bad tick; the database holds the state
                self.failures += 1
                log.exception("rollout engine tick failed; retrying in %ss", self.interval_s)
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def stop(self, *, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        self._stopping.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
