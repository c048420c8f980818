"""Artifact transfer: the block-request bitmap and the binary block codec.

Bitmap encoding: bit `i` stands for block `i`; block `i` is bit `i % 8` of byte `i // 8`, least significant
bit first (block 0 is `0x01` of byte 0). The byte string is `ceil(count / 8)` bytes long and its unused high
bits in the last byte are zero. On the wire (`BlockRequest.wanted`) it is standard base64 with padding.

Block data is binary (published on `artifact_blocks_topic`): an 80-byte header, big-endian, then the payload::

    offset size field
     0      4   magic b"EFBK"
     4      1   format version (1)
     5      1   flags (0; reserved)
     6      2   reserved (0)
     8     32   sha256 of the whole artifact (raw bytes)
    40      4   block index (uint32)
    44      4   payload length (uint32, 1..131072)
    48     32   sha256 of the payload (raw bytes; equals the manifest's block_sha256[index])
    80      n   payload
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Self

from pydantic import Field, model_validator

from edgefleet.protocols.errors import BlockError, ProtocolError
from edgefleet.protocols.manifest import Manifest
from edgefleet.protocols.wire import MAX_BLOCK_SIZE, MAX_BLOCKS, Digest, Message

__all__ = [
    "BLOCK_HEADER_SIZE",
    "BLOCK_MAGIC",
    "MAX_BLOCK_MESSAGE_BYTES",
    "Bitmap",
    "Block",
    "BlockRequest",
    "decode_block",
    "encode_block",
]

BLOCK_MAGIC = b"EFBK"
BLOCK_FORMAT_VERSION = 1
_HEADER = struct.Struct(">4sBBH32sII32s")
BLOCK_HEADER_SIZE = _HEADER.size
MAX_BLOCK_MESSAGE_BYTES = BLOCK_HEADER_SIZE + MAX_BLOCK_SIZE


class Bitmap:
    """A fixed-size set of block indices, stored as LSB-first bytes (see the module docstring).

    Agents persist `to_bytes()` so that a download resumes after a reboot::

        have = Bitmap(manifest.block_total)
        have.set(7)
        request = BlockRequest.for_missing(manifest.sha256, have)
    """

    __slots__ = ("_bits", "_count")

    def __init__(self, count: int, *, fill: bool = False) -> None:
        if not 1 <= count <= MAX_BLOCKS:
            raise ProtocolError(f"a bitmap holds 1..{MAX_BLOCKS} blocks, not {count}")
        self._count = count
        self._bits = bytearray(b"\xff" * self.byte_length(count) if fill else self.byte_length(count))
        if fill:
            self._clear_padding()

    @staticmethod
    def byte_length(count: int) -> int:
        """Bytes needed for `count` bits."""
        return (count + 7) // 8

    def _clear_padding(self) -> None:
        spare = self.byte_length(self._count) * 8 - self._count
        if spare:
            self._bits[-1] &= 0xFF >> spare

    @classmethod
    def from_bytes(cls, data: bytes, count: int) -> Bitmap:
        """Rebuild from `to_bytes()`; raises ProtocolError on a wrong length or set padding bits."""
        bitmap = cls(count)
        if len(data) != cls.byte_length(count):
            raise ProtocolError(f"bitmap of {count} blocks has {cls.byte_length(count)} bytes, not {len(data)}")
        bitmap._bits[:] = data
        before = bytes(bitmap._bits)
        bitmap._clear_padding()
        if bytes(bitmap._bits) != before:
            raise ProtocolError(f"bitmap of {count} blocks has bits set beyond block {count - 1}")
        return bitmap

    @classmethod
    def from_base64(cls, text: str, count: int) -> Bitmap:
        """Rebuild from `to_base64()` (standard alphabet, padded)."""
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"bitmap is not base64: {exc}") from exc
        return cls.from_bytes(raw, count)

    @property
    def count(self) -> int:
        """How many blocks the bitmap covers."""
        return self._count

    def _check(self, index: int) -> None:
        if not 0 <= index < self._count:
            raise ProtocolError(f"block {index} is outside 0..{self._count - 1}")

    def set(self, index: int) -> None:
        """Mark block `index`."""
        self._check(index)
        self._bits[index >> 3] |= 1 << (index & 7)

    def clear(self, index: int) -> None:
        """Unmark block `index`."""
        self._check(index)
        self._bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self._count:
            return False
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def __iter__(self) -> Iterator[int]:
        """The marked indices, ascending."""
        return (i for i in range(self._count) if i in self)

    def missing(self) -> Iterator[int]:
        """The unmarked indices, ascending."""
        return (i for i in range(self._count) if i not in self)

    def __len__(self) -> int:
        """How many indices are marked."""
        return sum(byte.bit_count() for byte in self._bits)

    def is_complete(self) -> bool:
        """Every block is marked."""
        return len(self) == self._count

    def inverted(self) -> Bitmap:
        """A new bitmap with every bit flipped (the blocks still missing, from the blocks held)."""
        flipped = Bitmap(self._count)
        flipped._bits[:] = bytes(~byte & 0xFF for byte in self._bits)
        flipped._clear_padding()
        return flipped

    def to_bytes(self) -> bytes:
        """The LSB-first byte string."""
        return bytes(self._bits)

    def to_base64(self) -> str:
        """The byte string in standard base64."""
        return base64.b64encode(self._bits).decode("ascii")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and (self._count, self._bits) == (other._count, other._bits)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Bitmap(count={self._count}, marked={len(self)})"


class BlockRequest(Message):
    """A device asks for the blocks of one artifact whose bits are set in `wanted`."""

    artifact_sha256: Digest
    block_count: Annotated[int, Field(ge=1, le=MAX_BLOCKS)]
    wanted: Annotated[
        str,
        Field(max_length=4 * ((MAX_BLOCKS // 8 + 2) // 3), description="base64 bitmap, LSB-first, bit i = block i"),
    ]

    @model_validator(mode="after")
    def _bitmap_fits(self) -> Self:
        try:
            Bitmap.from_base64(self.wanted, self.block_count)
        except ProtocolError as exc:
            raise ValueError(f"wanted: {exc}") from exc
        return self

    @classmethod
    def for_missing(cls, artifact_sha256: str, have: Bitmap) -> BlockRequest:
        """Ask for every block not marked in `have`."""
        return cls(artifact_sha256=artifact_sha256, block_count=have.count, wanted=have.inverted().to_base64())

    def bitmap(self) -> Bitmap:
        """The wanted blocks."""
        return Bitmap.from_base64(self.wanted, self.block_count)


@dataclass(frozen=True, slots=True)
class Block:
    """One decoded block; `sha256` is the payload's digest (hex), already checked against the payload."""

    artifact_sha256: str
    index: int
    payload: bytes
    sha256: str


def encode_block(artifact_sha256: str, index: int, payload: bytes) -> bytes:
    """Header plus payload, ready to publish on `artifact_blocks_topic(fleet, artifact_sha256)`."""
    try:
        digest = bytes.fromhex(artifact_sha256)
    except ValueError as exc:
        raise BlockError(f"artifact digest {artifact_sha256!r:.80} is not hex") from exc
    if len(digest) != 32:
        raise BlockError(f"artifact digest {artifact_sha256!r:.80} is not a sha256")
    if not 0 <= index < MAX_BLOCKS:
        raise BlockError(f"block index {index} is outside 0..{MAX_BLOCKS - 1}")
    if not 1 <= len(payload) <= MAX_BLOCK_SIZE:
        raise BlockError(f"block payload of {len(payload)} bytes: must be 1..{MAX_BLOCK_SIZE}")
    header = _HEADER.pack(
        BLOCK_MAGIC, BLOCK_FORMAT_VERSION, 0, 0, digest, index, len(payload), hashlib.sha256(payload).digest()
    )
    return header + payload


def decode_block(data: bytes, *, manifest: Manifest | None = None, expected_artifact: str | None = None) -> Block:
    """Parse one block message; raises BlockError on bad magic/version, truncation, length or checksum.

    With `manifest`, also check that the block belongs to its artifact and matches `block_sha256[index]` and the
    expected length (this catches a corrupted index, which the payload checksum alone cannot).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BlockError(f"block data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) < BLOCK_HEADER_SIZE:
        raise BlockError(f"block message of {len(data)} bytes is shorter than its {BLOCK_HEADER_SIZE}-byte header")
    magic, version, flags, reserved, digest, index, length, checksum = _HEADER.unpack_from(data)
    if magic != BLOCK_MAGIC:
        raise BlockError(f"block message starts with {magic!r}, not {BLOCK_MAGIC!r}")
    if version != BLOCK_FORMAT_VERSION or flags or reserved:
        raise BlockError(f"block format version {version} flags {flags} reserved {reserved} is not supported")
    if index >= MAX_BLOCKS:
        raise BlockError(f"block index {index} is outside 0..{MAX_BLOCKS - 1}")
    if not 1 <= length <= MAX_BLOCK_SIZE or len(data) - BLOCK_HEADER_SIZE != length:
        raise BlockError(
            f"block {index}: header says {length} payload bytes, message carries {len(data) - BLOCK_HEADER_SIZE}"
        )
    payload = data[BLOCK_HEADER_SIZE:]
    actual = hashlib.sha256(payload).digest()
    if actual != checksum:
        raise BlockError(f"block {index}: payload does not match its sha256 (corrupted in transit)")
    block = Block(artifact_sha256=digest.hex(), index=index, payload=payload, sha256=actual.hex())
    if manifest is not None:
        _check_against(block, manifest)
    if expected_artifact is not None and block.artifact_sha256 != expected_artifact:
        raise BlockError(f"block {index} belongs to artifact {block.artifact_sha256}, not {expected_artifact}")
    return block


def _check_against(block: Block, manifest: Manifest) -> None:
    if block.artifact_sha256 != manifest.sha256:
        raise BlockError(f"block {block.index} belongs to artifact {block.artifact_sha256}, not {manifest.sha256}")
    if block.index >= manifest.block_total:
        raise BlockError(f"block {block.index} is outside 0..{manifest.block_total - 1} of artifact {manifest.sha256}")
    if len(block.payload) != manifest.block_length(block.index) or block.sha256 != manifest.block_sha256[block.index]:
        raise BlockError(f"block {block.index} of artifact {manifest.sha256} does not match the manifest")
