"""The artifact store: files named by their sha256 under the edgefleet home, written atomically.

A file is written to a temporary name in the same directory, fsynced, then `os.replace`d into place and the
directory fsynced, so a crash leaves either the old state or the whole new file, never a torn one. The same
content stored twice is one file.

Example::

    store = ArtifactStore(home / "artifacts")
    digest, size = store.put_file(Path("model.onnx"))
    data = store.read_block(digest, offset=0, size=32768)
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from edgefleet.controller.errors import StoreError

__all__ = ["ArtifactStore"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Content-addressed files: `<root>/sha256/<first two hex>/<digest>`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, digest: str) -> Path:
        if not _SHA256.match(digest):
            raise StoreError(f"{digest!r} is not a sha256 hex digest")
        return self.root / "sha256" / digest[:2] / digest

    def path_for_sha256(self, digest: str) -> Path | None:
        """The stored file of `digest`, or None when it is not in the store (the block server's lookup)."""
        try:
            path = self.path_of(digest)
        except StoreError:
            return None
        return path if path.is_file() else None

    def has(self, digest: str) -> bool:
        return self.path_of(digest).is_file()

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path_of(digest)
        if target.is_file() and target.stat().st_size == len(data):
            return digest, len(data)
        self._write_atomically(target, [data])
        return digest, len(data)

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy a file into the store; returns its sha256 and size."""
        try:
            with source.open("rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise StoreError(f"cannot read {source} ({exc.strerror or exc})") from exc
        return self.put_bytes(data)

    def _write_atomically(self, target: Path, chunks: list[bytes]) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as handle:
                    for chunk in chunks:
                        handle.write(chunk)
                    handle.flush()
                    os.fsync(handle.fileno())
                tmp.chmod(0o444)
                tmp.replace(target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StoreError(f"cannot write artifact {target.name} under {self.root} ({exc.strerror or exc})") from exc

    def read(self, digest: str) -> bytes:
        path = self.path_of(digest)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StoreError(f"artifact {digest} is missing from the store {self.root}") from exc

    def read_block(self, digest: str, *, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` (fewer at the end of the file)."""
        if offset < 0 or size <= 0:
            raise StoreError(f"bad block range offset={offset} size={size} for {digest}")
        path = self.path_of(digest)
        try:
            with path.open("rb") as handle:
                handle.seek(offset)
                return handle.read(size)
        except OSError as exc:
            raise StoreError(f"artifact {digest} is missing from the store {self.root}") from exc

    def verify(self, digest: str) -> bool:
        """Re-hash the stored file; False when missing or corrupted."""
        path = self.path_of(digest)
        hasher = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    hasher.update(chunk)
        except OSError:
            return False
        return hasher.hexdigest() == digest
