"""The controller's Ed25519 signing key: created once by `edgefleet init`, private file mode 0600.

The private key is PKCS#8 PEM; the public key sits next to it (`.pub`, SubjectPublicKeyInfo PEM) so it can be
handed to devices.

Example::

    key = create_signing_key(settings.key_path)
    key = load_signing_key(settings.key_path)
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.controller.errors import KeyFileError

__all__ = ["create_signing_key", "load_signing_key", "public_key_path", "public_raw", "write_private_file"]


def public_key_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the first byte on (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create the key pair, or load it when it exists already (`init` is idempotent)."""
    if path.exists():
        return load_signing_key(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        write_private_file(path, pem)
        public_key_path(path).write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    except OSError as exc:
        raise KeyFileError(f"cannot write the signing key {path} ({exc.strerror or exc})") from exc
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"no signing key at {path}: run `edgefleet init` first") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read the signing key {path} ({exc.strerror or exc})") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw public key bytes (what manifests and devices use)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
