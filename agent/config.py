"""The agent's settings and the simulator's fault injections, validated when built."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from edgefleet.agent.errors import AgentError
from edgefleet.agent.tls import client_tls_context
from edgefleet.protocols.profile import DeviceProfile
from edgefleet.protocols.topics import check_id

if TYPE_CHECKING:
    from edgefleet.agent.speed import SimulatedSpeed

__all__ = ["AGENT_VERSION", "AgentConfig", "Faults"]

AGENT_VERSION = "0.1.0"


@dataclass(frozen=True, slots=True)
class Faults:
    """Faults a simulated device injects on purpose (all off by default).

    `drop_at_fraction`: break the connection once when this fraction of the download is on disk.
    `crash_during_install`: stop the agent abruptly (as a power cut would) in the middle of installing.
    `corrupt_blocks`: block indices whose first arrival is flipped (they must be refused and re-requested).
    `slow_factor`: extra multiplier on measured inference latency.
    """

    drop_at_fraction: float | None = None
    crash_during_install: bool = False
    corrupt_blocks: frozenset[int] = frozenset()
    slow_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything one agent needs; `durable=False` skips fsyncs (simulated devices share one disk)."""

    fleet: str
    device_id: str
    profile: DeviceProfile
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    # TLS to the broker (all None: plaintext). The broker's certificate is checked against `tls_ca`; `tls_cert`
    # (with `tls_key`, or holding the key itself) is presented when the broker asks for a client certificate.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    trusted_keys: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    telemetry_window_s: float = 10.0
    request_timeout_s: float = 5.0
    request_timeout_max_s: float = 30.0
    max_request_attempts: int = 6
    max_bad_block: int = 3
    bitmap_flush_blocks: int = 8  # persist the download bitmap after this many new blocks...
    bitmap_flush_s: float = 0.25  # ...and at least this long after the last time (fsyncs are paid per stretch)
    probation_s: float = 30.0
    probation_max_errors: int = 5
    keepalive_s: int = 30
    durable: bool = True
    # A simulated device's speed (device / host per model path, agent/speed.py); None: a real device, timed as is.
    speed: SimulatedSpeed | None = None
    outbox_max: int = 1000
    agent_version: str = AGENT_VERSION
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        try:
            check_id(self.fleet, what="fleet")
            check_id(self.device_id, what="device")
        except ValueError as exc:
            raise AgentError(str(exc)) from exc
        if self.telemetry_window_s <= 0 or self.request_timeout_s <= 0 or self.max_request_attempts < 1:
            raise AgentError(
                f"device {self.device_id}: telemetry window, request timeout and attempts must be positive"
            )
        if self.tls_ca is None and (self.tls_cert is not None or self.tls_key is not None):
            raise AgentError(f"device {self.device_id}: a TLS client certificate or key needs a CA file (tls_ca)")
        if self.tls_key is not None and self.tls_cert is None:
            raise AgentError(f"device {self.device_id}: a TLS key needs its certificate (tls_cert)")

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context for the broker connection (shared by devices with the same files), or None.

        Raises AgentError naming the file when one is missing, unreadable or not valid PEM.
        """
        if self.tls_ca is None:
            return None
        return client_tls_context(self.tls_ca, self.tls_cert, self.tls_key)
