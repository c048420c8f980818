"""One artifact download on disk: a sparse part file plus a persisted bitmap of the blocks already written.

Each block is checked against the manifest's per-block sha256 before it is written; a bad block is refused (the
caller re-requests it) and never reaches the file. The data is flushed before the bitmap that claims it, so after a
crash the bitmap can only lag behind the file (a block fetched twice), never run ahead of it (a hole taken as data).
The bitmap is persisted after at least `flush_every` new blocks and `flush_interval_s` seconds (and at the end):
a crash costs only the blocks of that last stretch, and a device pays its fsyncs per stretch, not per block.

Example::

    dl = Download(directory, artifact="abc", size=n, block_size=32768, block_hashes=hashes)
    if dl.accept(index, payload):
        ...
    if dl.complete:
        path = dl.part_path
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edgefleet.agent.errors import TransferError
from edgefleet.agent.persist import write_atomic

__all__ = ["Download", "block_count"]


def block_count(size: int, block_size: int) -> int:
    return max(1, -(-size // block_size))


class Download:
    """The part file and bitmap of one artifact, resumable across restarts."""

    def __init__(
        self,
        directory: Path,
        *,
        artifact: str,
        size: int,
        block_size: int,
        block_hashes: Sequence[str],
        durable: bool = True,
        flush_every: int = 8,
        flush_interval_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size <= 0 or block_size <= 0:
            raise TransferError(
                f"artifact {artifact}: size {size} and block size {block_size} must be positive", artifact=artifact
            )
        self.artifact = artifact
        self.size = size
        self.block_size = block_size
        self.count = block_count(size, block_size)
        if len(block_hashes) != self.count:
            raise TransferError(
                f"artifact {artifact}: manifest lists {len(block_hashes)} block hashes for {self.count} blocks",
                artifact=artifact,
            )
        self.hashes = [h.lower() for h in block_hashes]
        self.durable = durable
        self.flush_every = max(1, flush_every)
        self.flush_interval_s = flush_interval_s
        self._clock = clock
        self._flushed_at = clock()
        self.part_path = directory / f"{artifact}.part"
        self.bitmap_path = directory / f"{artifact}.bitmap"
        self.rejected = 0
        self.duplicates = 0
        self._unflushed = 0
        self._fd: int | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self._bits = self._load_bitmap()
        self._have = sum(b.bit_count() for b in self._bits)
        if not self.part_path.exists():
            with self.part_path.open("wb") as fh:
                fh.truncate(size)

    def _load_bitmap(self) -> bytearray:
        nbytes = (self.count + 7) // 8
        try:
            raw = self.bitmap_path.read_bytes()
        except FileNotFoundError:
            return bytearray(nbytes)
        if len(raw) != nbytes or not self.part_path.exists():
            return bytearray(nbytes)  # a bitmap from another artifact shape, or without data: start over
        return bytearray(raw)

    def bitmap_bytes(self) -> bytes:
        """The held blocks as LSB-first bytes (the layout of `edgefleet.protocols.blocks.Bitmap`)."""
        return bytes(self._bits)

    def has(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    @property
    def have(self) -> int:
        return self._have

    @property
    def complete(self) -> bool:
        return self._have == self.count

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self.has(i)]

    def expected_length(self, index: int) -> int:
        if index == self.count - 1:
            return self.size - index * self.block_size
        return self.block_size

    def accept(self, index: int, payload: bytes, *, sha256: str | None = None) -> bool:
        """Write block `index` when it matches its hash; False (and nothing written) when it does not.

        `sha256` is the payload's digest when the caller already computed it from these very bytes
        (`decode_block` does), so each block is hashed once. A block already held is ignored (False, counted
        in `duplicates`): shared broadcasts repeat blocks.
        """
        if not 0 <= index < self.count:
            self.rejected += 1
            return False
        if self.has(index):
            self.duplicates += 1
            return False
        digest = sha256 if sha256 is not None else hashlib.sha256(payload).hexdigest()
        if len(payload) != self.expected_length(index) or digest != self.hashes[index]:
            self.rejected += 1
            return False
        try:
            if self._fd is None:
                self._fd = os.open(self.part_path, os.O_WRONLY)
            os.pwrite(self._fd, payload, index * self.block_size)
        except OSError as exc:
            raise TransferError(
                f"cannot write block {index} of artifact {self.artifact}: {exc.strerror or exc}; check free space",
                artifact=self.artifact,
                block=index,
            ) from exc
        self._bits[index >> 3] |= 1 << (index & 7)
        self._have += 1
        self._unflushed += 1
        if self.complete or (
            self._unflushed >= self.flush_every and self._clock() - self._flushed_at >= self.flush_interval_s
        ):
            self.flush()
        return True

    def flush(self) -> None:
        """Make the written blocks durable, then persist the bitmap that claims them (in that order)."""
        if self._fd is not None:
            if self.durable:
                os.fsync(self._fd)
            if self.complete:
                os.close(self._fd)
                self._fd = None
        write_atomic(self.bitmap_path, bytes(self._bits), durable=self.durable)
        self._unflushed = 0
        self._flushed_at = self._clock()

    def close(self) -> None:
        """Flush and release the part file (the download may resume later from the persisted bitmap)."""
        if self._unflushed:
            self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with self.part_path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def abandon(self) -> None:
        """Release the part file without persisting anything more (a simulated power cut)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Delete the part file and bitmap (the job ended, or the data failed verification)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in (self.part_path, self.bitmap_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
