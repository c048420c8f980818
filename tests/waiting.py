"""`wait_for`: poll a condition until it holds or a timeout passes (tests that watch another thread or process)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, *, step: float = 0.05) -> bool:
    """True as soon as `condition()` holds; after `timeout` seconds, whatever it says one last time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()
