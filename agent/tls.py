"""TLS for the device's MQTT link: one client `ssl.SSLContext` per (CA, certificate, key), built from PEM files.

The broker's certificate is checked against the given CA file (not the system's), its name against the host the
device connects to, and nothing older than TLS 1.2 is spoken. A client certificate is optional (Mosquitto's
`require_certificate true` asks for one). Contexts are cached: ten thousand simulated devices share one, as they
share its CA (loading a CA file costs milliseconds and a context holds its certificates in memory).

Example::

    context = client_tls_context(Path("ca.pem"), Path("device.pem"), Path("device.key"))
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

from edgefleet.agent.errors import AgentError

__all__ = ["client_tls_context", "describe_tls_error"]


def _readable(path: Path, what: str) -> None:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise AgentError(f"TLS {what} {path} cannot be read ({exc.strerror or exc})") from exc


@functools.cache
def client_tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting only `ca`, presenting `cert` (with `key`, or the key inside `cert`) when given.

    Raises AgentError naming the file when one is missing, unreadable or not valid PEM.
    """
    if key is not None and cert is None:
        raise AgentError("a TLS key needs its certificate (--tls-cert)")
    _readable(ca, "CA file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, ValueError) as exc:
        raise AgentError(f"TLS CA file {ca} holds no valid PEM certificate ({exc})") from exc
    if cert is not None:
        _readable(cert, "certificate")
        if key is not None:
            _readable(key, "key")
        try:
            context.load_cert_chain(str(cert), str(key) if key is not None else None, password=_no_passphrase)
        except (ssl.SSLError, ValueError) as exc:
            raise AgentError(f"TLS certificate {cert} and key {key or cert} are not a valid PEM pair ({exc})") from exc
    return context


def _no_passphrase() -> bytes:
    """Instead of OpenSSL's prompt on the terminal (a service would hang at start): an encrypted key is an error."""
    raise ValueError("the private key is encrypted; the agent needs an unencrypted key file (mode 0600)")


def describe_tls_error(exc: BaseException) -> str:
    """One line for an operator: what failed in a TLS handshake and the usual cause."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        return f"the broker's certificate was refused: {why} (wrong --tls-ca, or a host name it does not name?)"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if "CERTIFICATE_REQUIRED" in reason.upper() or "HANDSHAKE_FAILURE" in reason.upper():
            return f"the broker refused the TLS handshake ({reason}; does it require a client certificate?)"
        if "WRONG_VERSION_NUMBER" in reason.upper() or "RECORD_LAYER" in reason.upper():
            return f"TLS failed ({reason}; is the broker's port a plaintext listener?)"
        return f"TLS failed ({reason})"
    if isinstance(exc, OSError):
        return f"the connection broke off in the TLS handshake ({exc}; is the port a plaintext listener?)"
    return str(exc)
