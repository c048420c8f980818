"""The device side of one artifact transfer: ask for missing blocks, take good ones, re-ask with back-off.

Every wait has a timeout. When no new block arrives for `timeout_s`, the missing blocks are requested again and
the timeout doubles (up to `timeout_max_s`); after `max_attempts` quiet periods in a row the transfer fails with
`ResultCode.CONNECTION_LOST` instead of hanging. Any good block resets the count. A quiet period is judged only
after the loop has read what was waiting on its sockets (`Reactor.call_after_io`), and while `input_pending()` says
bytes still wait unread on the connection, it is not silence: on a loop shared by thousands of simulated devices
one turn can outlast the timeout, and asking again for blocks sitting in the socket makes the server send them
twice. A block that does not match its manifest hash is refused, never written, and asked for again at once; a
block that keeps arriving bad (`max_bad_block` times) fails the transfer with `INTEGRITY_FAILURE` (the server's
copy is not the signed one).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from edgefleet.agent.download import Download
from edgefleet.agent.reactor import Reactor, Timer
from edgefleet.protocols.blocks import Bitmap, Block, BlockRequest
from edgefleet.protocols.codes import ResultCode

__all__ = ["Fetcher"]

log = logging.getLogger(__name__)


class Fetcher:
    """Drives one `Download` to completion over a request callable; all callbacks run on the reactor."""

    def __init__(
        self,
        download: Download,
        reactor: Reactor,
        *,
        send_request: Callable[[BlockRequest], bool],
        on_complete: Callable[[], None],
        on_fail: Callable[[ResultCode, str], None],
        on_progress: Callable[[int, int], None] | None = None,
        input_pending: Callable[[], bool] | None = None,
        timeout_s: float = 2.0,
        timeout_max_s: float = 16.0,
        max_attempts: int = 6,
        max_bad_block: int = 3,
    ) -> None:
        self.download = download
        self.reactor = reactor
        self._send = send_request
        self._on_complete = on_complete
        self._on_fail = on_fail
        self._on_progress = on_progress
        self._input_pending = input_pending
        self._timeout_s = timeout_s
        self._timeout_max_s = timeout_max_s
        self._max_attempts = max_attempts
        self._max_bad_block = max_bad_block
        self._attempts = 0
        self._last_progress = reactor.clock()
        self._timer: Timer | None = None
        self._bad: Counter[int] = Counter()
        self.done = False
        self.requests_sent = 0
        self.blocks_accepted = 0
        self._accepted_at_reconnect = -1  # blocks_accepted at the last reconnect (-1: none yet)

    def _current_timeout(self) -> float:
        return float(min(self._timeout_max_s, self._timeout_s * 2.0**self._attempts))

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.reactor.call_later(self._current_timeout(), self._on_timer)

    def start(self) -> None:
        """Ask for every missing block now and start the quiet-period timer."""
        if self.download.complete:
            self._finish()
            return
        self._request(None)
        self._arm()

    def _request(self, only: int | None) -> None:
        have = Bitmap.from_bytes(self.download.bitmap_bytes(), self.download.count)
        request = BlockRequest.for_missing(self.download.artifact, have)
        if only is not None:
            wanted = Bitmap(self.download.count)
            wanted.set(only)
            request = BlockRequest(
                artifact_sha256=self.download.artifact, block_count=wanted.count, wanted=wanted.to_base64()
            )
        if self._send(request):
            self.requests_sent += 1

    def reconnected(self) -> None:
        """The link is back: ask for what is missing at once rather than waiting for the timer.

        A reconnect with no block accepted since the previous one counts as an attempt: a link that flaps faster
        than the quiet timeout (e.g. two clients taking the same id in turns) must still end in CONNECTION_LOST.
        """
        if self.done:
            return
        if self.blocks_accepted == self._accepted_at_reconnect:
            self._attempts += 1
            if self._attempts >= self._max_attempts:
                self._fail(
                    ResultCode.CONNECTION_LOST,
                    f"the link came back {self._attempts} times in a row with no block of artifact "
                    f"{self.download.artifact} in between ({self.download.have}/{self.download.count} held); "
                    "giving up",
                )
                return
        self._accepted_at_reconnect = self.blocks_accepted
        self._request(None)
        self._last_progress = self.reactor.clock()
        self._arm()

    def _on_timer(self) -> None:
        self._timer = None
        if self.done:
            return
        if self._waited_enough():
            # looks quiet; decide once the loop has read what is waiting (a busy loop may not have looked yet)
            self._timer = self.reactor.call_after_io(self._on_quiet)

    def _waited_enough(self) -> bool:
        quiet = self.reactor.clock() - self._last_progress
        if quiet < self._current_timeout():  # blocks arrived since the timer was armed: wait the rest
            self._timer = self.reactor.call_later(self._current_timeout() - quiet, self._on_timer)
            return False
        return True

    def _on_quiet(self) -> None:
        self._timer = None
        if self.done or not self._waited_enough():
            return
        quiet = self.reactor.clock() - self._last_progress
        patience = self._current_timeout() + self._timeout_max_s  # so that even a stream of other bytes ends
        if self._input_pending is not None and quiet < patience and self._input_pending():
            # bytes wait on our connection that the loop has not read yet (it was busy, or they just came):
            # that is not silence; look again after the loop's next pass
            self._timer = self.reactor.call_after_io(self._on_quiet)
            return
        self._attempts += 1
        if self._attempts >= self._max_attempts:
            self._fail(
                ResultCode.CONNECTION_LOST,
                f"no block of artifact {self.download.artifact} for {self._attempts} timeouts "
                f"({self.download.have}/{self.download.count} blocks held); giving up",
            )
            return
        log.info(
            "artifact %s: no block for %.1fs, asking again for %s blocks (attempt %s)",
            self.download.artifact[:12],
            quiet,
            self.download.count - self.download.have,
            self._attempts,
        )
        self._request(None)
        self._last_progress = self.reactor.clock()
        self._arm()

    def on_block(self, block: Block) -> None:
        """Take one block from the broadcast (blocks of other artifacts are the caller's to filter)."""
        if self.done:
            return
        if self.download.has(block.index):
            self.download.duplicates += 1
            return
        if not self.download.accept(block.index, block.payload, sha256=block.sha256):
            self._bad[block.index] += 1
            if self._bad[block.index] >= self._max_bad_block:
                self._fail(
                    ResultCode.INTEGRITY_FAILURE,
                    f"block {block.index} of artifact {self.download.artifact} failed its manifest hash "
                    f"{self._bad[block.index]} times: the server's copy is not the signed artifact",
                )
                return
            log.info("artifact %s: block %s failed its hash, asking again", self.download.artifact[:12], block.index)
            self._request(block.index)
            return
        self.blocks_accepted += 1
        self._attempts = 0
        self._last_progress = self.reactor.clock()
        if self._on_progress is not None:
            self._on_progress(self.download.have, self.download.count)
        if self.download.complete:
            self._finish()

    def _finish(self) -> None:
        self.cancel()
        self._on_complete()

    def _fail(self, code: ResultCode, detail: str) -> None:
        self.cancel()
        self.download.flush()
        self._on_fail(code, detail)

    def cancel(self, *, crash: bool = False) -> None:
        """Stop; the progress made so far is persisted (not when simulating a power cut)."""
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if crash:
            self.download.abandon()
        else:
            self.download.close()
