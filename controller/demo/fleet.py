"""The demo's processes: a simulated fleet per device class (`edgefleet-agent simulate`), stopped by PID.

The agent runs in its own process (it never imports torch, and the controller never imports the agent): one
`edgefleet-agent simulate` per class (with `--credentials` when the broker checks passwords), in a session of its
own so that a Ctrl-C in the terminal reaches the demo only, which then stops the fleets in order (SIGINT, which the
agent handles cleanly; SIGKILL after a timeout).

Example::

    fleet = SimulatedFleet.start(FleetSpec(class_name="rpi4", profile_path=p, devices=10, ...))
    ...
    fleet.stop()
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgefleet.controller.errors import ControllerError

__all__ = ["FleetSpec", "SimulatedFleet", "agent_command", "simulated_ids"]

log = logging.getLogger(__name__)


class FleetProcessError(ControllerError):
    """A simulated fleet could not be started or ended early."""


def simulated_ids(class_name: str, devices: int) -> list[str]:
    """The ids `simulate --id-prefix CLASS` gives its devices (`CLASS-00000`...), registered before it starts."""
    return [f"{class_name}-{i:05d}" for i in range(devices)]


def agent_command() -> list[str]:
    """`edgefleet-agent` next to this Python (the venv's script), else `python -m edgefleet.agent.cli`."""
    script = Path(sys.executable).with_name("edgefleet-agent")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "edgefleet.agent.cli"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetSpec:
    class_name: str
    profile_path: Path
    devices: int
    host: str
    port: int
    fleet: str
    trusted_key: Path
    dataset: Path
    data_dir: Path
    log_path: Path
    telemetry_window_s: float = 5.0
    rate_hz: float = 1.0
    infer_fraction: float = 1.0
    credentials: Path | None = None  # `device register --out` CSV: the devices log in with their passwords
    slow_devices: int = 0  # the first K devices run `slow_factor` times slower than their profile says
    slow_factor: float = 1.0

    def argv(self) -> list[str]:
        login = ["--credentials", str(self.credentials)] if self.credentials is not None else []
        slow = []
        if self.slow_devices > 0 and self.slow_factor != 1.0:
            slow = ["--fault-devices", str(self.slow_devices), "--slow", f"{self.slow_factor:g}"]
        return [
            *agent_command(),
            "simulate",
            "--host", self.host,
            "--port", str(self.port),
            "--fleet", self.fleet,
            "--class", str(self.profile_path),
            "--id-prefix", self.class_name,
            "--devices", str(self.devices),
            "--trusted-key", str(self.trusted_key),
            "--dataset", str(self.dataset),
            "--rate", f"{self.rate_hz:g}",
            "--infer-fraction", f"{self.infer_fraction:g}",
            "--telemetry-window", f"{self.telemetry_window_s:g}",
            "--data-dir", str(self.data_dir),
            "--log-level", "warning",
            *login,
            *slow,
        ]  # fmt: skip


class SimulatedFleet:
    """One `edgefleet-agent simulate` process; its output goes to `spec.log_path`."""

    def __init__(self, spec: FleetSpec, proc: subprocess.Popen[bytes], log_file: IO[bytes]) -> None:
        self.spec = spec
        self.proc = proc
        self._log_file = log_file

    @classmethod
    def start(cls, spec: FleetSpec) -> SimulatedFleet:
        spec.data_dir.mkdir(parents=True, exist_ok=True)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = spec.log_path.open("ab")
        try:
            proc = subprocess.Popen(
                spec.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            log_file.close()
            raise FleetProcessError(f"cannot start the simulated {spec.class_name} fleet: {exc}") from exc
        log.info("simulated fleet %s: pid %s, %s devices", spec.class_name, proc.pid, spec.devices)
        return cls(spec, proc, log_file)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        """Raise when the process ended by itself (with the end of its log, which says why)."""
        code = self.proc.poll()
        if code is not None:
            raise FleetProcessError(
                f"the simulated {self.spec.class_name} fleet (pid {self.proc.pid}) exited with code {code}: "
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.spec.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self, *, timeout: float = 15.0) -> int | None:
        """SIGINT (a clean stop: offline status, sessions closed), then SIGKILL; returns the exit code."""
        proc = self.proc
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("simulated fleet %s (pid %s) did not stop; killing it", self.spec.class_name, proc.pid)
                    proc.kill()
                    proc.wait(timeout=timeout)
        finally:
            self._log_file.close()
        return proc.returncode
