"""Ed25519 signing and verification of manifests, artifact digest checks and device compatibility checks.

`cryptography` is allowed in protocols for this one job: the controller signs and every agent verifies, so
both ends must agree byte for byte on the canonical form, and keeping it in one module is how they agree.

Canonical form (what is signed): the manifest's JSON-mode dump with JSON keys (`schema`, not
`schema_version`), serialised as UTF-8 JSON with keys sorted at every level, no whitespace (`,` and `:`
separators), non-ASCII characters written as themselves, floats in Python's shortest round-trip form, and
times in UTC (`2026-01-02T03:04:05Z`). I.e. ``json.dumps(manifest.model_dump(mode="json"), sort_keys=True,
separators=(",", ":"), ensure_ascii=False).encode("utf-8")``.

Example::

    private, public = generate_keypair()
    signed = sign_manifest(manifest, private)
    manifest = verify_manifest(signed, trusted_keys={key_id(public): public}, now=now, current_version=3)
    verify_artifact(manifest, data)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from edgefleet.protocols.errors import (
    DigestMismatchError,
    DowngradeError,
    ExpiredError,
    IncompatibleError,
    ProtocolError,
    SignatureInvalidError,
    UnknownKeyError,
)
from edgefleet.protocols.manifest import Manifest, SignedManifest
from edgefleet.protocols.messages import Birth, Capabilities
from edgefleet.protocols.profile import DeviceProfile

__all__ = [
    "canonical_bytes",
    "check_compatible",
    "generate_keypair",
    "key_id",
    "public_key_of",
    "sign_manifest",
    "verify_artifact",
    "verify_block",
    "verify_manifest",
    "version_tuple",
]

_RAW = serialization.Encoding.Raw


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as raw bytes: (32-byte private seed, 32-byte public key)."""
    private = Ed25519PrivateKey.generate()
    return (
        private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw),
    )


def key_id(public_key: bytes) -> str:
    """The id of a raw 32-byte public key: the first 16 hex digits of its sha256."""
    if len(public_key) != 32:
        raise ProtocolError(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()[:16]


def _private_key(key: bytes | Ed25519PrivateKey) -> Ed25519PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return key
    if len(key) != 32:
        raise ProtocolError(f"an Ed25519 private key has 32 raw bytes, not {len(key)}")
    return Ed25519PrivateKey.from_private_bytes(key)


def public_key_of(private_key: bytes | Ed25519PrivateKey) -> bytes:
    """The raw public key that belongs to a private key."""
    return _private_key(private_key).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes that are signed (see the module docstring)."""
    try:
        text = json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8")
    except (ValueError, RecursionError, UnicodeError) as exc:
        raise ProtocolError(f"manifest {manifest.artifact_name} has no canonical JSON form: {exc}") from exc


def sign_manifest(manifest: Manifest, private_key: bytes | Ed25519PrivateKey) -> SignedManifest:
    """Sign `manifest`; its `key_id` is set to the id of `private_key`'s public key."""
    private = _private_key(private_key)
    kid = key_id(public_key_of(private))
    if manifest.key_id != kid:
        try:
            manifest = Manifest.model_validate({**manifest.model_dump(), "key_id": kid})
        except ValidationError as exc:  # pragma: no cover - the manifest was valid and key ids are valid
            raise ProtocolError(f"manifest {manifest.artifact_name}: {exc}") from exc
    signature = private.sign(canonical_bytes(manifest))
    return SignedManifest(manifest=manifest, key_id=kid, signature=base64.b64encode(signature).decode("ascii"))


def verify_manifest(
    signed: SignedManifest,
    *,
    trusted_keys: Mapping[str, bytes],
    now: datetime,
    current_version: int | None,
    allow_rollback: bool = False,
) -> Manifest:
    """Check key, signature, expiry and version, in that order; return the manifest when all hold.

    `current_version` is the version running on the device for this device class (None before the first
    deploy). A version not above it raises DowngradeError unless `allow_rollback` (an explicit rollback).
    """
    manifest = signed.manifest
    public = trusted_keys.get(signed.key_id)
    if public is None:
        raise UnknownKeyError(
            f"manifest {manifest.artifact_name} v{manifest.version} is signed by key {signed.key_id}, "
            "which is not trusted: add its public key to the device's trusted keys"
        )
    try:
        verifier = Ed25519PublicKey.from_public_bytes(public)
    except ValueError as exc:
        raise UnknownKeyError(f"trusted key {signed.key_id} is not a 32-byte Ed25519 public key") from exc
    try:
        verifier.verify(signed.signature_bytes(), canonical_bytes(manifest))
    except InvalidSignature as exc:
        raise SignatureInvalidError(
            f"manifest {manifest.artifact_name} v{manifest.version}: signature does not match key {signed.key_id} "
            "(tampered or corrupted in transit)"
        ) from exc
    if now.tzinfo is None:
        raise ProtocolError("verify_manifest needs an aware `now` (e.g. datetime.now(UTC))")
    if now >= manifest.expires_at:
        raise ExpiredError(
            f"manifest {manifest.artifact_name} v{manifest.version} expired at {manifest.expires_at.isoformat()}"
        )
    if current_version is not None and manifest.version <= current_version and not allow_rollback:
        raise DowngradeError(
            f"manifest {manifest.artifact_name} v{manifest.version} is not above the running v{current_version}; "
            "only an explicit rollback may install it"
        )
    return manifest


def verify_artifact(manifest: Manifest, data: bytes) -> None:
    """Raise DigestMismatchError unless `data` has the manifest's size and sha256."""
    if len(data) != manifest.size_bytes:
        raise DigestMismatchError(
            f"artifact {manifest.artifact_name} has {len(data)} bytes, the manifest says {manifest.size_bytes}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(digest, manifest.sha256):
        raise DigestMismatchError(
            f"artifact {manifest.artifact_name} hashes to {digest}, the manifest says {manifest.sha256}"
        )


def verify_block(manifest: Manifest, index: int, payload: bytes) -> None:
    """Raise DigestMismatchError unless block `index` has the length and sha256 the manifest lists."""
    expected_length = manifest.block_length(index)
    if len(payload) != expected_length:
        raise DigestMismatchError(
            f"block {index} of artifact {manifest.sha256} has {len(payload)} bytes, expected {expected_length}"
        )
    if hashlib.sha256(payload).hexdigest() != manifest.block_sha256[index]:
        raise DigestMismatchError(f"block {index} of artifact {manifest.sha256} does not match its sha256")


def version_tuple(version: str) -> tuple[int, ...]:
    """`"1.17.3"` → `(1, 17, 3)`; a suffix such as `-dev` or `+cpu` is ignored."""
    numbers: list[int] = []
    for part in version.replace("+", "-").split("-", 1)[0].split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def check_compatible(manifest: Manifest, target: Birth | Capabilities | DeviceProfile) -> None:
    """Raise IncompatibleError when the target cannot run the artifact (device class, opset, onnxruntime)."""
    if isinstance(target, Birth):
        device_class: str | None = target.device_class
        opset, runtime = target.capabilities.opset, target.capabilities.onnxruntime_version
    elif isinstance(target, Capabilities):
        device_class, opset, runtime = None, target.opset, target.onnxruntime_version
    else:
        device_class, opset, runtime = target.name, target.opset, target.onnxruntime_version
    what = f"artifact {manifest.artifact_name} v{manifest.version}"
    if device_class is not None and device_class != manifest.device_class:
        raise IncompatibleError(f"{what} is for device class {manifest.device_class}, not {device_class}")
    if opset < manifest.opset:
        raise IncompatibleError(f"{what} needs ONNX opset {manifest.opset}; the device supports up to {opset}")
    if version_tuple(runtime) < version_tuple(manifest.min_onnxruntime_version):
        raise IncompatibleError(
            f"{what} needs onnxruntime >= {manifest.min_onnxruntime_version}; the device has {runtime}"
        )
