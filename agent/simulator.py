"""A simulated fleet: N agents in one process on one selector loop, each with its own identity, credentials,
data directory and state machine.

Inference is real onnxruntime, for a sample of the devices (`infer_fraction`), with sessions shared per model. At
start the simulator times the reference workload on this host (agent/speed.py) and scales each model's measured
latency by device / host for the model's path (fp32 or int8), so a simulated rpi4 runs as its profile says on any
host: a slower host, or one without VNNI, times the workload slower too. Faults can be injected into the first
`fault_devices` devices; a device that 'crashes' is restarted from its data directory after `restart_after_s`, as a
reboot would.

Example::

    sim = FleetSimulator(SimulatorSpec(devices=100, profile=profile, data_root=tmp))
    sim.start()
    sim.run(duration=60)
    print(sim.summary())
    sim.stop()
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig, Faults
from edgefleet.agent.errors import AgentError, InferenceError
from edgefleet.agent.reactor import Reactor, Timer
from edgefleet.agent.replay import Dataset
from edgefleet.agent.runner import SessionPool
from edgefleet.agent.speed import SimulatedSpeed, WorkloadTimer, random_input
from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes

__all__ = ["FleetSimulator", "SimulationSummary", "SimulatorSpec"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SimulatorSpec:
    devices: int
    profile: DeviceProfile
    data_root: Path
    fleet: str = "default"
    host: str = "127.0.0.1"
    port: int = 1883
    # TLS to the broker (see AgentConfig); one SSL context is shared by every simulated device
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    id_prefix: str | None = None
    first_index: int = 0
    # Explicit ids (from a credentials file) win over PREFIX-00000 numbering.
    device_ids: tuple[str, ...] = ()
    trusted_keys: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    passwords: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    telemetry_window_s: float = 10.0
    probation_s: float = 30.0
    dataset: Dataset | None = None
    infer_fraction: float = 0.0
    infer_rate_hz: float = 1.0
    faults: Faults = field(default_factory=Faults)
    fault_devices: int = 0
    connect_rate_per_s: float = 1000.0
    keepalive_s: int = 60
    restart_after_s: float = 1.0
    # This host's reference times at one thread, fixed; None: timed when the simulator starts and again every
    # `speed_refresh_s` seconds (agent/speed.py), so a host that gets busier does not make the devices slower.
    host_reference: ReferenceTimes | None = None
    speed_refresh_s: float = 5.0

    def device_id(self, index: int) -> str:
        if self.device_ids:
            return self.device_ids[index]
        return f"{self.id_prefix or self.profile.name}-{self.first_index + index:05d}"


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    devices: int
    connected: int
    states: dict[str, int]
    versions: dict[int | None, int]
    inferences: int
    crashes: int

    def __str__(self) -> str:
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.states.items()))
        versions = ", ".join(f"v{k} {v}" for k, v in sorted(self.versions.items(), key=lambda kv: kv[0] or 0))
        return (
            f"{self.devices} devices, {self.connected} connected; jobs: {states or 'none'}; "
            f"models: {versions or 'none'}; {self.inferences} inferences; {self.crashes} simulated crashes"
        )


class FleetSimulator:
    def __init__(self, spec: SimulatorSpec, *, reactor: Reactor | None = None) -> None:
        if spec.devices < 1:
            raise AgentError(f"simulate at least one device, not {spec.devices}")
        self.spec = spec
        self._timer: WorkloadTimer | None = None
        host = spec.host_reference
        if host is None:
            self._timer = WorkloadTimer(threads=1)
            host = self._timer.time()
        self.speed = SimulatedSpeed(spec.profile, host)
        self._retimer: Timer | None = None
        log.info(
            "class %s on this host: fp32 models x %.3g, int8 x %.3g (host reference %s)",
            spec.profile.name, self.speed.fp32, self.speed.int8, host,
        )  # fmt: skip
        self.config_for(0).tls_context()  # a missing or bad TLS file fails here, not once per device later
        self._own_reactor = reactor is None
        self.reactor = reactor or Reactor()
        self.sessions = SessionPool()
        self.agents: list[Agent] = []
        self.inferences = 0
        self.crashes = 0
        self._next = 0
        self._rng = random.Random(0)
        infer_count = round(spec.devices * spec.infer_fraction)
        self._inferring = set(self._rng.sample(range(spec.devices), infer_count)) if infer_count else set()

    def config_for(self, index: int) -> AgentConfig:
        spec = self.spec
        device = spec.device_id(index)
        return AgentConfig(
            fleet=spec.fleet,
            device_id=device,
            profile=spec.profile,
            data_dir=spec.data_root / device,
            host=spec.host,
            port=spec.port,
            username=device,
            password=spec.passwords.get(device),
            tls_ca=spec.tls_ca,
            tls_cert=spec.tls_cert,
            tls_key=spec.tls_key,
            trusted_keys=spec.trusted_keys,
            telemetry_window_s=spec.telemetry_window_s,
            probation_s=spec.probation_s,
            keepalive_s=spec.keepalive_s,
            durable=False,
            speed=self.speed,
            faults=spec.faults if index < spec.fault_devices else Faults(),
        )

    def _make_agent(self, config: AgentConfig) -> Agent:
        return Agent(config, reactor=self.reactor, sessions=self.sessions, on_crash=self._on_crash)

    def start(self) -> None:
        """Create and connect the devices, `connect_rate_per_s` at a time (a thundering herd hurts any broker)."""
        self._connect_batch()
        if self._timer is not None:
            self._retimer = self.reactor.call_later(self.spec.speed_refresh_s, self._retime)

    def _retime(self) -> None:
        """Time the reference workload again (~10-20 ms of one thread): the host's load moves."""
        assert self._timer is not None  # noqa: S101 - scheduled only with a timer
        try:
            self.speed.update(self._timer.time(rounds=3, runs=20, warmup=2))
        except InferenceError as exc:  # onnxruntime failing on a model it ran before: keep the last numbers
            log.warning("re-timing the reference workload failed: %s", exc)
        log.debug("class %s: fp32 x %.3g, int8 x %.3g", self.spec.profile.name, self.speed.fp32, self.speed.int8)
        self._retimer = self.reactor.call_later(self.spec.speed_refresh_s, self._retime)

    def _connect_batch(self) -> None:
        batch = max(1, int(self.spec.connect_rate_per_s / 20))
        for _ in range(batch):
            if self._next >= self.spec.devices:
                return
            index = self._next
            self._next += 1
            agent = self._make_agent(self.config_for(index))
            self.agents.append(agent)
            agent.start()
            if index in self._inferring:
                self._schedule_inference(index, first=True)
        self.reactor.call_later(0.05, self._connect_batch)

    def _schedule_inference(self, index: int, *, first: bool = False) -> None:
        period = 1.0 / max(self.spec.infer_rate_hz, 1e-3)
        delay = self._rng.uniform(0, period) if first else period
        self.reactor.call_later(delay, lambda: self._infer(index))

    def _infer(self, index: int) -> None:
        agent = self.agents[index]
        if agent.alive and agent.slots.current_name() is not None:
            try:
                if self.spec.dataset is not None:
                    x, label = self.spec.dataset.sample(self.inferences)
                    agent.infer(x, label=label)
                else:
                    runner = agent.runner()
                    agent.infer(next(iter(random_input(runner).values())))
                self.inferences += 1
            except AgentError as exc:
                log.debug("device %s: inference failed: %s", agent.config.device_id, exc)
        self._schedule_inference(index)

    def _on_crash(self, agent: Agent) -> None:
        self.crashes += 1
        index = self.agents.index(agent)

        def reboot() -> None:
            config = replace(agent.config, faults=Faults(slow_factor=agent.config.faults.slow_factor))
            fresh = self._make_agent(config)
            self.agents[index] = fresh
            fresh.start()

        self.reactor.call_later(self.spec.restart_after_s, reboot)

    @property
    def connected(self) -> int:
        return sum(1 for a in self.agents if a.link.connected)

    def run(self, *, duration: float | None = None, until: Callable[[], bool] | None = None) -> bool:
        return self.reactor.run(until=until, timeout=duration)

    def stop(self) -> None:
        """Stop every device cleanly; closes the loop too when the simulator made it."""
        if self._retimer is not None:
            self._retimer.cancel()
        for agent in self.agents:
            agent.stop()
        self.reactor.run(timeout=0.2)
        for agent in self.agents:
            agent.link.close()
        if self._own_reactor:
            self.reactor.close()

    def summary(self) -> SimulationSummary:
        states: Counter[str] = Counter()
        versions: Counter[int | None] = Counter()
        for agent in self.agents:
            states[agent.updater.record.state.value] += 1
            current = agent.slots.current()
            versions[current.version if current else None] += 1
        return SimulationSummary(
            devices=len(self.agents),
            connected=self.connected,
            states=dict(states),
            versions=dict(versions),
            inferences=self.inferences,
            crashes=self.crashes,
        )
