"""`Periodic`, the one background loop of the controller's duties: it outlives a failing step, wakes, stops."""

from __future__ import annotations

import logging

import pytest
from waiting import wait_for

from edgefleet.controller.periodic import Periodic


def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the database went away")

    loop = Periodic(step, interval_s=60, name="test-loop")
    with caplog.at_level(logging.ERROR):
        loop.start()
        assert wait_for(lambda: loop.failures == 1)
        loop.wake()  # not a minute: at once
        assert wait_for(lambda: loop.steps == 1, timeout=5)
        loop.stop(timeout=5)
    assert "test-loop: a step failed" in caplog.text
    assert loop.stopping
    count = len(calls)
    loop.wake()
    assert not wait_for(lambda: len(calls) > count, timeout=0.3)  # stopped means stopped


def test_wait_first_and_bad_intervals() -> None:
    calls: list[int] = []
    loop = Periodic(lambda: calls.append(1), interval_s=60, name="flush", wait_first=True)
    loop.start()
    assert not wait_for(lambda: bool(calls), timeout=0.3)  # it waits for the interval (or a wake) first
    loop.wake()
    assert wait_for(lambda: bool(calls), timeout=5)
    loop.stop(timeout=5)
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        Periodic(lambda: None, interval_s=0, name="x")
