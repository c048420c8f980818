"""Loading the controller's public signing keys a device trusts: PEM `.pub` files or 64 hex digits."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.errors import AgentError
from edgefleet.protocols.signing import key_id

__all__ = ["load_trusted_keys", "parse_public_key"]

_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def parse_public_key(value: str) -> bytes:
    """A raw 32-byte Ed25519 public key from 64 hex digits or from a PEM file path."""
    if _HEX.fullmatch(value.strip()):
        return bytes.fromhex(value.strip())
    path = Path(value)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentError(f"trusted key {value!r}: not 64 hex digits and not a readable file ({exc})") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise AgentError(f"{path} is not a PEM public key (the controller writes one next to its key, *.pub)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AgentError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_trusted_keys(values: Iterable[str]) -> MappingProxyType[str, bytes]:
    """Key id -> raw public key, for `AgentConfig.trusted_keys`."""
    keys = {}
    for value in values:
        raw = parse_public_key(value)
        keys[key_id(raw)] = raw
    return MappingProxyType(keys)
