"""Mosquitto configuration for a registered fleet: config file, password file and ACL, from the registry.

- every device's username is its id and its password hash is the registry's `$7$` string (no secret needed);
- `use_username_as_clientid true`, so a device cannot take over another's session by claiming its client id;
- ACL patterns keyed on `%u` (from `protocols.topics`), so a device publishes only its own topics;
- a controller user (and one for the CLI's deploys) that may use everything under the topic root; its password
  is generated once and kept in the home directory (mode 0600) for `edgefleet serve`;
- anonymous clients refused; the tuned settings of `ManagedMosquitto` (nodelay, queue limits, persistence);
- with the `broker_tls_*` settings the listener speaks TLS only (`cafile`/`certfile`/`keyfile`, TLS 1.2+,
  `require_certificate` when `broker_tls_require_certificate`); passwords and ACLs apply as before.

`broker run` records its mosquitto's pid in `<home>/broker/mosquitto.pid`; `device register` then rewrites the
password file and ACL and sends that process SIGHUP (`reload_running_broker`), so devices registered after the broker
started can connect at once (mosquitto reads both files at start and on SIGHUP only).

Example::

    files = write_broker_config(settings, registry.broker_accounts())
    ManagedMosquitto(...).start()  # or `mosquitto -c files.config`
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from edgefleet.controller.artifacts.keys import write_private_file
from edgefleet.controller.broker.mosquitto import ManagedMosquitto, TlsListener
from edgefleet.controller.config import CLI_USERNAME, CONTROLLER_USERNAME, Settings
from edgefleet.controller.credentials import hash_secret, new_secret, password_file_line
from edgefleet.controller.errors import ConfigError
from edgefleet.protocols.topics import controller_acl_patterns, device_acl_patterns

__all__ = [
    "BrokerFiles",
    "controller_secret",
    "forget_broker_pid",
    "managed_broker",
    "record_broker_pid",
    "reload_running_broker",
    "write_broker_config",
]


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerFiles:
    config: Path
    password_file: Path
    acl_file: Path
    devices: int


def controller_secret(settings: Settings) -> str:
    """The controller's MQTT password, created (mode 0600) the first time it is needed."""
    path = settings.controller_secret_path
    try:
        if path.exists():
            return path.read_text(encoding="utf-8").strip()
        secret = new_secret()
        write_private_file(path, (secret + "\n").encode())
    except OSError as exc:
        raise ConfigError(f"cannot read or write the controller's MQTT secret {path} ({exc.strerror or exc})") from exc
    return secret


def managed_broker(settings: Settings) -> ManagedMosquitto:
    """The broker `broker config` describes and `broker run` starts (listener from the MQTT settings)."""
    broker_dir = settings.broker_dir
    tls = settings.broker_tls
    return ManagedMosquitto(
        broker_dir,
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        allow_anonymous=False,
        extra_config=[
            "use_username_as_clientid true",
            f"password_file {broker_dir / 'passwd'}",
            f"acl_file {broker_dir / 'acl'}",
        ],
        tls=TlsListener(tls.ca, tls.cert, tls.key, tls.require_certificate) if tls is not None else None,
    )


def acl_text() -> str:
    lines = [
        "# written by `edgefleet broker config`: devices (username = device id) use their own topics only",
        *device_acl_patterns("+"),
    ]
    for user in (CONTROLLER_USERNAME, CLI_USERNAME):
        lines += ["", f"user {user}", *controller_acl_patterns()]
    return "\n".join(lines) + "\n"


def write_broker_config(settings: Settings, accounts: Iterable[tuple[str, str]]) -> BrokerFiles:
    """Write config, password file and ACL under `<home>/broker`; `accounts` are (device id, `$7$` hash) pairs."""
    broker = managed_broker(settings)
    secret = controller_secret(settings)
    lines = [password_file_line(user, hash_secret(secret)) for user in (CONTROLLER_USERNAME, CLI_USERNAME)]
    count = 0
    for username, stored in accounts:
        lines.append(password_file_line(username, stored))
        count += 1
    passwd = settings.broker_dir / "passwd"
    acl = settings.broker_dir / "acl"
    try:
        write_private_file(passwd, ("\n".join(lines) + "\n").encode())
        write_private_file(acl, acl_text().encode())
        config = broker.write_config()
    except OSError as exc:
        raise ConfigError(
            f"cannot write the broker config under {settings.broker_dir} ({exc.strerror or exc})"
        ) from exc
    return BrokerFiles(config=config, password_file=passwd, acl_file=acl, devices=count)


def _pid_file(settings: Settings) -> Path:
    return settings.broker_dir / "mosquitto.pid"


def record_broker_pid(settings: Settings, pid: int) -> None:
    """`broker run`: say which process serves this home's broker config."""
    try:
        _pid_file(settings).write_text(f"{pid}\n", encoding="utf-8")
    except OSError as exc:  # only the reload on `device register` is lost
        raise ConfigError(f"cannot write {_pid_file(settings)} ({exc.strerror or exc})") from exc


def forget_broker_pid(settings: Settings) -> None:
    _pid_file(settings).unlink(missing_ok=True)


def _running_broker_pid(settings: Settings) -> int | None:
    """The recorded pid, if that process is still a mosquitto running this home's config (pids get reused)."""
    try:
        pid = int(_pid_file(settings).read_text(encoding="utf-8").strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    config = str(managed_broker(settings).config_path).encode()
    return pid if b"mosquitto" in cmdline and config in cmdline else None


def reload_running_broker(settings: Settings, accounts: Iterable[tuple[str, str]]) -> int | None:
    """Rewrite the password file and ACL and SIGHUP the broker `broker run` started; its pid, or None if none runs."""
    pid = _running_broker_pid(settings)
    if pid is None:
        return None
    write_broker_config(settings, accounts)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        return None
    return pid
