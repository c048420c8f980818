"""Start and stop a Mosquitto broker that edgefleet manages itself (tests, `make demo`, `broker run`).

Mosquitto's defaults hurt a fleet: `max_queued_messages` 1000 silently drops QoS 1 messages queued for a
slow subscriber, and Nagle's algorithm adds 40-90 ms to every request/response. The settings below fix both.

With a `TlsListener` the one listener speaks TLS only (1.2 or later): Mosquitto's `cafile`/`certfile`/`keyfile`,
and with `require_certificate` it also refuses clients without a certificate signed by that CA.

Example::

    with ManagedMosquitto(workdir) as broker:
        client.connect(broker.host, broker.port)
    ManagedMosquitto(workdir, tls=TlsListener(ca=Path("ca.pem"), cert=Path("broker.pem"), key=Path("broker.key")))
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from edgefleet.controller.errors import BrokerError

__all__ = [
    "ManagedMosquitto",
    "TlsListener",
    "find_mosquitto",
    "free_port",
    "port_answers",
    "tuned_settings",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class TlsListener:
    """PEM files for a TLS listener: the CA clients' certificates are checked against, the broker's own pair."""

    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = False

    def config_lines(self) -> list[str]:
        """Mosquitto's per-listener TLS options (they must follow the `listener` line they apply to)."""
        for path in (self.ca, self.cert, self.key):
            if "\n" in str(path) or "\r" in str(path):
                raise BrokerError(f"TLS file path {path!r} holds a line break")
        return [
            f"cafile {self.ca}",
            f"certfile {self.cert}",
            f"keyfile {self.key}",
            "tls_version tlsv1.2",  # the oldest accepted (Mosquitto 2.x: a minimum)
            f"require_certificate {'true' if self.require_certificate else 'false'}",
        ]


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, looking in sbin too (Debian installs it there)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_answers(host: str, port: int, *, timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port succeeds within the timeout."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tuned_settings(*, persistence_dir: Path | None = None) -> list[str]:
    """Broker-wide settings every edgefleet broker needs (see the module docstring for why)."""
    lines = [
        "set_tcp_nodelay true",
        "max_queued_messages 100000",
        "max_inflight_messages 1000",
        # a deploy command may carry a manifest of up to 1 MiB (4096 block digests plus validation samples)
        "max_packet_size 2097152",
        "persistent_client_expiration 14d",
    ]
    if persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {persistence_dir}/"]
    return lines


def _keep_user() -> list[str]:
    # Started as root, Mosquitto drops to the `mosquitto` user before it reads the password and ACL files,
    # which then cannot open files in a private working directory. A broker we manage runs as whoever
    # started it instead.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ["user root"]
    return []


class ManagedMosquitto:
    """A Mosquitto process on a free 127.0.0.1 port, stopped by its own PID on exit.

    `extra_config` lines are appended after the listener (ACLs, password files...). With no extra
    configuration the listener allows anonymous clients, which is what tests and the demo want.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_config: list[str] | None = None,
        allow_anonymous: bool = True,
        start_timeout: float = 10.0,
        tls: TlsListener | None = None,
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._extra = list(extra_config or [])
        self._allow_anonymous = allow_anonymous
        self._start_timeout = start_timeout
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        lines = [
            "# written by edgefleet: a broker it manages itself",
            f"listener {self.port} {self.host}",
            *(self.tls.config_lines() if self.tls is not None else []),
            f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
            *tuned_settings(persistence_dir=data),
            *_keep_user(),
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            *self._extra,
        ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return self.config_path

    def start(self) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed: install Debian's `mosquitto` package")
        if port_answers(self.host, self.port, timeout=0.2):
            # Another process holds the port: "answering" below would be that one, and ours would exit at once.
            raise BrokerError(
                f"{self.host}:{self.port} is already in use by another process: stop it, or choose another port "
                "(edgefleet --mqtt-port N)"
            )
        self.write_config()
        self._proc = subprocess.Popen(
            [binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise BrokerError(f"mosquitto exited at start (code {self._proc.returncode}): {err.strip()}")
            if port_answers(self.host, self.port, timeout=0.2):
                log.info("managed mosquitto pid %s on %s:%s", self._proc.pid, self.host, self.port)
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not answer on {self.host}:{self.port} within {self._start_timeout}s")

    def stop(self, *, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        if proc.stderr is not None:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        """True while the broker process this object started is alive."""
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the broker to exit (e.g. `broker run`); returns its exit code, None on timeout."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def restart(self) -> None:
        """Stop and start again on the same port, keeping persisted sessions (fault tests)."""
        self.stop()
        self.start()

    def __enter__(self) -> ManagedMosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
