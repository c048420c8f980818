"""Manifest signing and verification: each way a manifest can be wrong fails with its own error."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest

from edgefleet.protocols import (
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    MAX_PAYLOAD_BYTES,
    Birth,
    Capabilities,
    DeployCommand,
    DeviceProfile,
    DigestMismatchError,
    DowngradeError,
    ExpiredError,
    IncompatibleError,
    Manifest,
    MessageKind,
    ProtocolError,
    ResultCode,
    SchemaError,
    SignatureInvalidError,
    SignedManifest,
    UnknownKeyError,
    block_digests,
    canonical_bytes,
    check_compatible,
    decode,
    encode,
    generate_keypair,
    key_id,
    sign_manifest,
    verify_artifact,
    verify_block,
    verify_manifest,
)
from edgefleet.protocols.profile import ReferenceTimes


def _verify(samples: Any, signed: SignedManifest, **options: Any) -> Manifest:
    options.setdefault("now", samples.now)
    options.setdefault("current_version", 2)
    return verify_manifest(signed, trusted_keys={samples.key_id: samples.public_key}, **options)


def test_a_good_manifest_verifies(samples: Any) -> None:
    signed = samples.signed()
    assert _verify(samples, signed) == samples.manifest()
    assert _verify(samples, signed, current_version=None).version == 3


def test_flipped_bit_in_signature(samples: Any) -> None:
    signed = samples.signed()
    raw = bytearray(signed.signature_bytes())
    raw[10] ^= 0x01
    forged = signed.model_copy(update={"signature": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(SignatureInvalidError, match="signature does not match") as info:
        _verify(samples, forged)
    assert info.value.result_code is ResultCode.SIGNATURE_INVALID


def test_flipped_bit_in_body(samples: Any) -> None:
    payload = encode(samples.signed())
    # '3' (0x33) -> '2' (0x32) in `"version":3` is one bit: still a valid manifest, but not the signed one.
    at = payload.index(b'"version":3') + len(b'"version":')
    tampered = payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1 :]
    signed = decode(SignedManifest, tampered)
    assert signed.manifest.version == 2
    with pytest.raises(SignatureInvalidError):
        _verify(samples, signed, current_version=1)


def test_every_single_bit_flip_is_caught(samples: Any) -> None:
    """Flip each bit of a signed manifest in turn: the result never verifies unless it means the same thing."""
    original = samples.signed()
    payload = encode(original)
    for position in range(0, len(payload) * 8, 7):  # every 7th bit keeps the test fast and still hits every byte
        tampered = bytearray(payload)
        tampered[position // 8] ^= 1 << (position % 8)
        try:
            signed = decode(SignedManifest, bytes(tampered))
            manifest = _verify(samples, signed, current_version=None)
        except ProtocolError:
            continue
        # Accepted only when the flip did not change the meaning (e.g. `Z`/`z` in a time, `e`/`E` in a float).
        assert manifest == original.manifest, f"bit {position} changed the manifest and still verified"


def test_wrong_key(samples: Any) -> None:
    other_private, other_public = generate_keypair()
    signed = sign_manifest(samples.manifest(), other_private)
    assert signed.key_id == key_id(other_public) != samples.key_id
    with pytest.raises(UnknownKeyError, match="not trusted") as info:
        _verify(samples, signed)
    assert info.value.result_code is ResultCode.UNKNOWN_KEY
    # Signed by another key but claiming the trusted key id: the signature check catches it.
    forged = SignedManifest(manifest=samples.manifest(), key_id=samples.key_id, signature=signed.signature)
    with pytest.raises(SignatureInvalidError):
        _verify(samples, forged)


def test_lower_or_equal_version_is_a_downgrade(samples: Any) -> None:
    signed = samples.signed(version=3)
    with pytest.raises(DowngradeError, match="not above the running v3") as info:
        _verify(samples, signed, current_version=3)
    assert info.value.result_code is ResultCode.DOWNGRADE_REFUSED
    with pytest.raises(DowngradeError):
        _verify(samples, signed, current_version=7)
    assert _verify(samples, signed, current_version=7, allow_rollback=True).version == 3


def test_past_expiry(samples: Any) -> None:
    signed = samples.signed(expires_at=samples.now + timedelta(minutes=5))
    _verify(samples, signed)
    with pytest.raises(ExpiredError, match="expired") as info:
        _verify(samples, signed, now=samples.now + timedelta(minutes=5))
    assert info.value.result_code is ResultCode.EXPIRED


def test_the_four_failures_are_distinct_classes() -> None:
    classes = {SignatureInvalidError, UnknownKeyError, DowngradeError, ExpiredError, DigestMismatchError}
    assert len(classes) == 5
    assert len({cls.result_code for cls in classes}) == 5


def test_trusted_key_of_the_wrong_size(samples: Any) -> None:
    with pytest.raises(UnknownKeyError, match="32-byte"):
        verify_manifest(samples.signed(), trusted_keys={samples.key_id: b"short"}, now=samples.now, current_version=1)


def test_naive_now_is_refused(samples: Any) -> None:
    with pytest.raises(ProtocolError, match="aware"):
        _verify(samples, samples.signed(), now=samples.now.replace(tzinfo=None))


def test_canonical_form_is_sorted_compact_utf8(samples: Any) -> None:
    manifest = samples.manifest()
    text = canonical_bytes(manifest).decode("utf-8")
    assert " " not in text.replace("quantize_static", "")
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert '"schema":1' in text
    assert '"created_at":"2026-11-29T11:00:00Z"' in text


def test_signature_must_be_canonical_base64(samples: Any) -> None:
    data = json.loads(encode(samples.signed()))
    signature = data["signature"]
    # The last character before '==' carries 4 unused bits; setting one gives the same bytes, a different text.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(signature[-3])
    data["signature"] = signature[:-3] + alphabet[last ^ 0x01] + "=="
    with pytest.raises(SchemaError, match="canonical base64"):
        decode(SignedManifest, json.dumps(data).encode())


def test_key_ids_must_agree(samples: Any) -> None:
    data = json.loads(encode(samples.signed()))
    data["key_id"] = "0" * 16
    with pytest.raises(SchemaError, match="key_id"):
        decode(SignedManifest, json.dumps(data).encode())


def test_verify_artifact_and_blocks(samples: Any) -> None:
    manifest = samples.manifest()
    verify_artifact(manifest, samples.artifact)
    with pytest.raises(DigestMismatchError, match="hashes to"):
        verify_artifact(manifest, samples.artifact[:-1] + b"\x00")
    with pytest.raises(DigestMismatchError, match="bytes"):
        verify_artifact(manifest, samples.artifact + b"\x00")
    verify_block(manifest, 4, samples.artifact[4 * 4096 :])
    assert manifest.block_length(4) == len(samples.artifact) - 4 * 4096
    with pytest.raises(DigestMismatchError):
        verify_block(manifest, 0, samples.artifact[4096:8192])
    with pytest.raises(ProtocolError, match="outside"):
        verify_block(manifest, 5, b"x")


def test_block_digest_helper_bounds(samples: Any) -> None:
    assert len(block_digests(samples.artifact, 4096)) == 5
    assert len(block_digests(samples.artifact, 131072)) == 1
    with pytest.raises(ProtocolError, match="block size"):
        block_digests(samples.artifact, 1024)
    with pytest.raises(ProtocolError, match=r"1\.\."):
        block_digests(b"", 4096)


def test_manifest_block_list_must_match_size(samples: Any) -> None:
    data = json.loads(encode(samples.manifest()))
    data["block_sha256"] = data["block_sha256"][:-1]
    with pytest.raises(SchemaError, match="block_sha256: has 4 digests"):
        decode(Manifest, json.dumps(data).encode())


def test_compatibility(samples: Any) -> None:
    manifest = samples.manifest()
    birth: Birth = samples.birth()
    check_compatible(manifest, birth)
    check_compatible(manifest, birth.capabilities)
    old_runtime = birth.capabilities.model_copy(update={"onnxruntime_version": "1.16.3"})
    with pytest.raises(IncompatibleError, match=r"onnxruntime >= 1\.17") as info:
        check_compatible(manifest, old_runtime)
    assert info.value.result_code is ResultCode.UNSUPPORTED
    with pytest.raises(IncompatibleError, match="opset 17"):
        check_compatible(manifest, Capabilities.model_validate({**birth.capabilities.model_dump(), "opset": 13}))
    profile = DeviceProfile(
        name="jetson",
        storage_budget_bytes=10**7,
        ram_budget_bytes=10**9,
        latency_budget_ms=5.0,
        threads=4,
        int8_dot_product=True,
        reference_ms=ReferenceTimes(fp32_conv=0.2, fp32_matmul=0.1, int8_conv=0.1, int8_matmul=0.05),
    )
    with pytest.raises(IncompatibleError, match="device class rpi4, not jetson"):
        check_compatible(manifest, profile)
    check_compatible(manifest, profile.model_copy(update={"name": "rpi4"}))


def test_the_largest_manifest_fits_in_a_command(samples: Any) -> None:
    """4096 blocks of 128 KiB (512 MiB) plus validation samples still make a command under the 1 MiB limit."""
    data = json.loads(encode(samples.manifest()))
    data.update(
        size_bytes=MAX_BLOCKS * MAX_BLOCK_SIZE, block_size=MAX_BLOCK_SIZE, block_sha256=["ab" * 32] * MAX_BLOCKS
    )
    data["validation_samples"] = data["validation_samples"] * 64
    signed = sign_manifest(Manifest.model_validate(data), samples.private_key)
    command = DeployCommand(
        job_id="big", issued_at=samples.now, expires_at=samples.now + timedelta(hours=1), manifest=signed
    )
    payload = encode(command)
    assert len(payload) < MAX_PAYLOAD_BYTES[MessageKind.COMMAND]
    assert decode(DeployCommand, payload) == command
