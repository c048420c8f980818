"""Device and controller MQTT credentials: generated once, stored only as Mosquitto-compatible hashes.

The hash string is exactly what Mosquitto 2's password file holds (`$7$` = PBKDF2-SHA512,
`$7$<iterations>$<base64 salt>$<base64 hash>`), so `broker config` can write the password file from the
registry without ever seeing a secret again.

Example::

    secret = new_secret()
    stored = hash_secret(secret)
    assert verify_secret(secret, stored)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["hash_secret", "new_secret", "password_file_line", "verify_secret"]

# Mosquitto's own default is 101 iterations. Secrets here are 32 random bytes, so the work factor
# guards little; 1000 keeps every device connect cheap for the broker.
ITERATIONS = 1000
SALT_BYTES = 12
_PREFIX = "$7$"


def new_secret() -> str:
    """A random password for one device (URL-safe, 43 characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The `$7$` PBKDF2-SHA512 string Mosquitto understands."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, iterations)
    return f"{_PREFIX}{iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    """True when `secret` matches the stored `$7$` string (constant-time compare)."""
    try:
        _, kind, iterations, salt_b64, digest_b64 = stored.split("$")
        if kind != "7":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        got = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def password_file_line(username: str, stored: str) -> str:
    """One line of a Mosquitto password file."""
    if ":" in username or "\n" in username:
        raise ValueError(f"username {username!r} cannot go into a Mosquitto password file")
    return f"{username}:{stored}"
