"""One selector loop for many connections and timers, so one process can drive thousands of MQTT clients.

paho's `loop_start` runs a thread per client and `select()`s on 1,024 descriptors at most, which ends at about 339
clients; here every socket is registered in one `selectors.DefaultSelector` (epoll on Linux) and every timer sits
in one heap. Everything runs on the loop's thread; other threads hand work over with `call_soon_threadsafe`.
`call_after_io` runs a callback once the loop has read what was waiting on its sockets: a timeout that fires
while one turn of a busy loop (thousands of simulated devices) took longer than the timeout itself can look
again after the data that did arrive has been read, instead of taking "not read yet" for "nothing came".

Example::

    reactor = Reactor()
    reactor.call_later(1.0, tick)
    reactor.run(until=lambda: done)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

__all__ = ["IOHandler", "Reactor", "Timer"]

UNTIL_EVERY_S = 0.01

log = logging.getLogger(__name__)


class IOHandler(Protocol):
    def handle_read(self) -> None: ...
    def handle_write(self) -> None: ...


class Timer:
    """A scheduled call; `cancel()` makes the loop skip it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    """A selector loop with timers. `clock` must be monotonic seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._pending: deque[Callable[[], None]] = deque()
        self._after_io: list[Timer] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)  # noqa: FBT003
        self._wake_w.setblocking(False)  # noqa: FBT003
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self.thread_id: int | None = None

    # -- sockets ----------------------------------------------------------------------------------------------
    def add_reader(self, sock: socket.socket, handler: IOHandler) -> None:
        self._selector.register(sock, selectors.EVENT_READ, handler)

    def set_writing(self, sock: socket.socket, handler: IOHandler, *, writing: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        try:
            self._selector.modify(sock, events, handler)
        except (KeyError, ValueError):
            log.debug("socket %s no longer registered", sock)

    def remove(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # -- timers -----------------------------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.clock() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_after_io(self, callback: Callable[[], None]) -> Timer:
        """Run `callback` (on the loop's thread) after the loop's next look at its sockets; cancellable."""
        timer = Timer(self.clock(), callback)
        self._after_io.append(timer)
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the next turn of the loop (from the loop's own thread)."""
        self._pending.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop's thread soon (safe from any thread)."""
        self._pending.append(callback)
        # a full wake-up pipe means the loop is awake anyway
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- running ----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True
        self.call_soon_threadsafe(lambda: None)

    def _run_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._call(timer.callback)

    @staticmethod
    def _call(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # a failing callback must never stop the loop of every other device
            log.exception("callback %r failed", callback)

    def run_once(self, *, max_wait: float = 0.1) -> None:
        while self._pending:
            self._call(self._pending.popleft())
        self._run_timers()
        wait = max_wait
        if self._timers:
            wait = min(wait, max(0.0, self._timers[0][0] - self.clock()))
        after_io, self._after_io = self._after_io, []
        if self._pending or after_io:
            wait = 0.0
        for key, events in self._selector.select(wait):
            handler = key.data
            if handler is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            if events & selectors.EVENT_READ:
                self._call(handler.handle_read)
            if events & selectors.EVENT_WRITE:
                self._call(handler.handle_write)
        for timer in after_io:
            if not timer.cancelled:
                self._call(timer.callback)

    def run(self, *, until: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Run until `until()` is true (True), `timeout` passes or `stop()` is called (False)."""
        self.thread_id = threading.get_ident()
        self._stopping = False
        deadline = None if timeout is None else self.clock() + timeout
        next_check = 0.0
        while not self._stopping:
            now = self.clock()
            # `until` may walk thousands of devices: ask it at most every UNTIL_EVERY_S, not on every turn
            if until is not None and now >= next_check:
                if until():
                    return True
                next_check = now + UNTIL_EVERY_S
            if deadline is not None and now >= deadline:
                return False
            self.run_once(max_wait=min(0.1, UNTIL_EVERY_S) if until is not None else 0.1)
        return False

    def close(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
