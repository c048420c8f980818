"""The block-request bitmap and the binary block codec: round trips and every kind of corruption."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.protocols import (
    BLOCK_HEADER_SIZE,
    MAX_BLOCKS,
    Bitmap,
    BlockError,
    BlockRequest,
    ProtocolError,
    SchemaError,
    decode,
    decode_block,
    encode,
    encode_block,
)

DIGEST = hashlib.sha256(b"artifact").hexdigest()


def test_bitmap_layout_is_lsb_first() -> None:
    bitmap = Bitmap(10)
    for index in (0, 3, 9):
        bitmap.set(index)
    assert bitmap.to_bytes() == bytes([0b00001001, 0b00000010])
    assert bitmap.to_base64() == "CQI="
    assert list(bitmap) == [0, 3, 9]
    assert list(bitmap.missing()) == [1, 2, 4, 5, 6, 7, 8]
    assert len(bitmap) == 3
    bitmap.clear(3)
    assert 3 not in bitmap
    assert 0 in bitmap
    assert 10 not in bitmap


def test_bitmap_full_and_inverted() -> None:
    full = Bitmap(10, fill=True)
    assert full.is_complete()
    assert full.to_bytes() == b"\xff\x03"
    assert list(full.inverted()) == []
    assert Bitmap(10).inverted() == full


@settings(max_examples=100, deadline=None)
@given(st.integers(1, MAX_BLOCKS).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_bitmap_round_trips(case: tuple[int, set[int]]) -> None:
    count, marked = case
    bitmap = Bitmap(count)
    for index in marked:
        bitmap.set(index)
    assert set(bitmap) == marked
    assert Bitmap.from_bytes(bitmap.to_bytes(), count) == bitmap
    assert Bitmap.from_base64(bitmap.to_base64(), count) == bitmap
    assert set(bitmap.inverted()) == set(range(count)) - marked


def test_bitmap_refuses_bad_input() -> None:
    with pytest.raises(ProtocolError, match=r"1\.\.4096"):
        Bitmap(0)
    with pytest.raises(ProtocolError, match=r"1\.\.4096"):
        Bitmap(MAX_BLOCKS + 1)
    with pytest.raises(ProtocolError, match="2 bytes"):
        Bitmap.from_bytes(b"\x00", 10)
    with pytest.raises(ProtocolError, match="beyond block 9"):
        Bitmap.from_bytes(b"\x00\x04", 10)
    with pytest.raises(ProtocolError, match="base64"):
        Bitmap.from_base64("!!", 10)
    with pytest.raises(ProtocolError, match="outside"):
        Bitmap(10).set(10)


def test_block_request_round_trip_and_limits() -> None:
    have = Bitmap(MAX_BLOCKS)
    have.set(5)
    request = BlockRequest.for_missing(DIGEST, have)
    data = encode(request)
    assert len(data) < 1024
    again = decode(BlockRequest, data)
    assert set(again.bitmap()) == set(range(MAX_BLOCKS)) - {5}
    bad = json.loads(data)
    bad["block_count"] = 10
    with pytest.raises(SchemaError, match="wanted"):
        decode(BlockRequest, json.dumps(bad).encode())


def test_block_codec_round_trip() -> None:
    payload = b"\x01\x02" * 3000
    data = encode_block(DIGEST, 7, payload)
    assert len(data) == BLOCK_HEADER_SIZE + len(payload) == 80 + 6000
    assert data[:4] == b"EFBK"
    block = decode_block(data, expected_artifact=DIGEST)
    assert (block.artifact_sha256, block.index, block.payload) == (DIGEST, 7, payload)
    assert block.sha256 == hashlib.sha256(payload).hexdigest()


def _corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        (lambda d: d[:40], "shorter than its 80-byte header"),
        (lambda d: d[:-1], "header says 100 payload bytes"),
        (lambda d: d + b"x", "header says 100 payload bytes"),
        (lambda d: _corrupt(d, 0, b"XFBK"), "not b'EFBK'"),
        (lambda d: _corrupt(d, 4, b"\x02"), "version 2"),
        (lambda d: _corrupt(d, 5, b"\x01"), "flags 1"),
        (lambda d: _corrupt(d, 40, struct.pack(">I", 10**6)), "outside"),
        (lambda d: _corrupt(d, 44, struct.pack(">I", 0)), "header says 0"),
        (lambda d: _corrupt(d, 48, b"\x00"), "does not match its sha256"),
        (lambda d: _corrupt(d, 90, b"\xff"), "does not match its sha256"),
        (lambda d: _corrupt(d, 8, b"\x00" * 32), "belongs to artifact"),
    ],
)
def test_block_corruption_is_caught(mangle: Any, words: str) -> None:
    data = encode_block(DIGEST, 3, bytes(range(100)))
    with pytest.raises(BlockError, match=words):
        decode_block(mangle(data), expected_artifact=DIGEST)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    with pytest.raises(BlockError):
        decode_block(data)


def test_blocks_are_checked_against_the_manifest(samples: Any) -> None:
    manifest = samples.manifest()
    last = manifest.block_total - 1
    good = encode_block(manifest.sha256, last, samples.artifact[last * 4096 :])
    assert decode_block(good, manifest=manifest).index == last
    moved = encode_block(manifest.sha256, 0, samples.artifact[last * 4096 :])
    with pytest.raises(BlockError, match="does not match the manifest"):
        decode_block(moved, manifest=manifest)
    with pytest.raises(BlockError, match="outside"):
        decode_block(encode_block(manifest.sha256, last + 1, b"x"), manifest=manifest)
    with pytest.raises(BlockError, match="belongs to artifact"):
        decode_block(encode_block(DIGEST, 0, b"x"), manifest=manifest)


def test_any_flipped_bit_is_caught(samples: Any) -> None:
    manifest = samples.manifest()
    data = encode_block(manifest.sha256, 4, samples.artifact[4 * 4096 :])
    for position in range(0, (BLOCK_HEADER_SIZE + 64) * 8, 3):
        tampered = bytearray(data)
        tampered[position // 8] ^= 1 << (position % 8)
        with pytest.raises(BlockError):
            decode_block(bytes(tampered), manifest=manifest)


def test_encode_block_refuses_bad_arguments() -> None:
    with pytest.raises(BlockError, match="not hex"):
        encode_block("xyz", 0, b"x")
    with pytest.raises(BlockError, match="not a sha256"):
        encode_block("00", 0, b"x")
    with pytest.raises(BlockError, match="index"):
        encode_block(DIGEST, MAX_BLOCKS, b"x")
    with pytest.raises(BlockError, match="payload"):
        encode_block(DIGEST, 0, b"")
    with pytest.raises(BlockError, match="payload"):
        encode_block(DIGEST, 0, b"x" * (128 * 1024 + 1))
