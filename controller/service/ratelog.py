"""Log a rejected message at most once per sender per interval, so a broken or hostile device cannot flood logs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """`warn(sender, fmt, *args)` logs when `sender` has not been logged within `interval` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        max_senders: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_senders = max_senders
        self.clock = clock
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def warn(self, sender: str, fmt: str, *args: object) -> bool:
        now = self.clock()
        last = self._last.get(sender)
        if last is not None and now - last < self.interval:
            self.suppressed += 1
            return False
        if len(self._last) >= self.max_senders:
            cutoff = now - self.interval
            self._last = {k: v for k, v in self._last.items() if v >= cutoff}
            if len(self._last) >= self.max_senders:
                self._last.clear()
        self._last[sender] = now
        self.logger.warning(fmt, *args)
        return True
