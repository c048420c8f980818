"""`Periodic`: a function called on a thread of its own every few seconds, or at once when woken, until stopped.

The controller's background duties (the rollout engine's tick, the recompression loop's step, the telemetry flush)
all have this shape; it is written once here. A call that raises is logged with its traceback and counted in
`failures`, and the loop goes on: each duty keeps its state in the database, so the next call starts from there.

Example::

    ticker = Periodic(engine.tick, interval_s=1.0, name="edgefleet-rollouts")
    ticker.start()
    ticker.wake()          # a device came online: tick now
    ticker.stop()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    """Calls `step()` every `interval_s` seconds (first at start, or first after one interval with `wait_first`)."""

    def __init__(self, step: Callable[[], object], *, interval_s: float, name: str, wait_first: bool = False) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 (got {interval_s})")
        self.step = step
        self.interval_s = interval_s
        self.name = name
        self.wait_first = wait_first
        self.steps = 0
        self.failures = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called (a long step may check it)."""
        return self._stopping.is_set()

    @property
    def woken(self) -> bool:
        """True while a wake-up is pending."""
        return self._wake.is_set()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Call the step now rather than at the end of the interval."""
        self._wake.set()

    def _loop(self) -> None:
        if self.wait_first:
            self._sleep()
        while not self._stopping.is_set():
            try:
                self.step()
                self.steps += 1
            except Exception:  # the loop outlives one bad call; the duty's state is in the database
                self.failures += 1
                log.exception("%s: a step failed; retrying in %ss", self.name, self.interval_s)
            self._sleep()

    def _sleep(self) -> None:
        self._wake.wait(self.interval_s)
        self._wake.clear()

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop after the current step; wait at most `timeout` seconds for it."""
        thread, self._thread = self._thread, None
        self._stopping.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
