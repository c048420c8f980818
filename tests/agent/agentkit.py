"""Helpers for the agent tests: tiny ONNX models, signed manifests, a small test-only controller side.

The controller side is the real `BlockServer` on an `MqttLink`, sharing the agents' reactor, so a whole
deploy runs on one thread against a real Mosquitto and the tests stay deterministic and fast.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig, Faults
from edgefleet.agent.mqtt import MqttLink
from edgefleet.agent.reactor import Reactor
from edgefleet.controller.service.blockserver import BlockServer
from edgefleet.protocols import topics
from edgefleet.protocols.codec import encode
from edgefleet.protocols.commands import ConfigureCommand, DeployCommand, RollbackCommand
from edgefleet.protocols.manifest import (
    InlineTensor,
    Manifest,
    SignedManifest,
    TensorSpec,
    Tolerances,
    ValidationSample,
    block_digests,
)
from edgefleet.protocols.messages import Birth, JobEvent
from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes
from edgefleet.protocols.signing import generate_keypair, key_id, sign_manifest
from edgefleet.protocols.telemetry import TelemetryBatch

PROFILE = DeviceProfile(
    name="testbox",
    storage_budget_bytes=10_000_000,
    ram_budget_bytes=256 * 2**20,
    latency_budget_ms=100.0,
    threads=1,
    int8_dot_product=False,
    onnxruntime_version="1.17",
    opset=17,
    block_size_bytes=4096,
    reference_ms=ReferenceTimes(fp32_conv=1.0, fp32_matmul=1.0, int8_conv=1.0, int8_matmul=1.0),
)
FLEET = "testfleet"
_ids = itertools.count()


def tiny_model(seed: int, *, pad_bytes: int = 0) -> bytes:
    """A 4 -> 8 -> 3 MLP (Gemm, Relu, Gemm); `pad_bytes` of unused initializer make it span several blocks."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"]),
    ]
    if pad_bytes:
        inits.append(numpy_helper.from_array(rng.integers(0, 255, size=pad_bytes, dtype=np.uint8), "pad"))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _tensor(a: np.ndarray) -> InlineTensor:
    return InlineTensor.from_bytes(a.astype("<f4").tobytes(), dtype="float32", shape=a.shape)


def validation_samples(model: bytes, *, n: int = 4, perturb: float = 0.0) -> tuple[ValidationSample, ...]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    out = []
    for _ in range(n):
        x = rng.normal(size=(1, 4)).astype(np.float32)
        y = session.run(None, {"x": x})[0] + perturb
        out.append(ValidationSample(inputs={"x": _tensor(x)}, expected={"y": _tensor(y)}))
    return tuple(out)


@dataclass
class Keys:
    private: bytes
    public: bytes

    @property
    def trusted(self) -> MappingProxyType[str, bytes]:
        return MappingProxyType({key_id(self.public): self.public})


def new_keys() -> Keys:
    private, public = generate_keypair()
    return Keys(private, public)


def build_manifest(
    model: bytes,
    *,
    version: int,
    keys: Keys,
    block_size: int = 4096,
    expires_in: timedelta = timedelta(days=1),
    samples: tuple[ValidationSample, ...] | None = None,
    now: datetime | None = None,
    opset: int = 13,
) -> SignedManifest:
    now = now or datetime.now(UTC)
    manifest = Manifest(
        artifact_name=f"tiny-v{version}",
        model_name="tiny",
        device_class=PROFILE.name,
        version=version,
        sha256=hashlib.sha256(model).hexdigest(),
        size_bytes=len(model),
        block_size=block_size,
        block_sha256=block_digests(model, block_size),
        created_at=now - timedelta(minutes=1),
        expires_at=now + expires_in,
        key_id=key_id(keys.public),
        inputs=(TensorSpec(name="x", dtype="float32", shape=("N", 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("N", 3)),),
        validation_samples=validation_samples(model) if samples is None else samples,
        tolerances=Tolerances(abs_tol=1e-4, rel_tol=1e-3),
        opset=opset,
        min_onnxruntime_version="1.16",
    )
    return sign_manifest(manifest, keys.private)


@dataclass
class Controller:
    """A test-only controller: the real BlockServer plus command publishing and uplink collection."""

    reactor: Reactor
    host: str
    port: int
    artifacts: dict[str, Path] = field(default_factory=dict)
    events: dict[str, list[JobEvent]] = field(default_factory=lambda: defaultdict(list))
    births: dict[str, list[Birth]] = field(default_factory=lambda: defaultdict(list))
    telemetry: dict[str, list[TelemetryBatch]] = field(default_factory=lambda: defaultdict(list))
    requests: int = 0
    session_expiry_s: int = 0
    server: BlockServer = field(init=False)
    link: MqttLink = field(init=False)

    def __post_init__(self) -> None:
        self.server = BlockServer(
            publish=lambda topic, payload, qos: self.link.publish(topic, payload, qos=qos),
            artifact_path=self.artifacts.get,
            rate_limit_bytes_per_s=None,
            max_inflight=32,
            coalesce_s=0.02,
            resend_holdoff_s=0.0,  # tests re-ask at once for corrupted blocks; holdoff has its own unit test
            clock=self.reactor.clock,
        )
        self.link = MqttLink(
            self.reactor,
            client_id=f"ctl-{next(_ids)}-{id(self) % 10000}",
            host=self.host,
            port=self.port,
            on_message=self._on_message,
            on_connect=lambda _present: self.link.subscribe(topics.controller_filters(FLEET)),
            on_publish=self.server.on_published,
            session_expiry_s=self.session_expiry_s,
            max_inflight=1000,
        )
        self.link.connect()
        self.reactor.run(until=lambda: self.link.connected, timeout=10)
        self.reactor.run(timeout=0.1)  # let the SUBACK arrive
        self._pump()

    def _pump(self) -> None:
        wait = self.server.pump()
        self.reactor.call_later(min(max(wait, 0.001), 0.02), self._pump)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse_topic(topic)
        device = parsed.device or ""
        if parsed.kind is topics.TopicKind.BLOCK_REQUEST:
            self.requests += 1
            self.server.handle_request(topic, payload)
        elif parsed.kind is topics.TopicKind.EVENTS:
            self.events[device].append(JobEvent.model_validate_json(payload))
        elif parsed.kind is topics.TopicKind.BIRTH:
            self.births[device].append(Birth.model_validate_json(payload))
        elif parsed.kind is topics.TopicKind.TELEMETRY:
            self.telemetry[device].append(TelemetryBatch.model_validate_json(payload))

    def offer(self, model: bytes, directory: Path) -> str:
        digest = hashlib.sha256(model).hexdigest()
        path = directory / f"{digest}.onnx"
        path.write_bytes(model)
        self.artifacts[digest] = path
        return digest

    def send(self, device: str, command: DeployCommand | RollbackCommand | ConfigureCommand) -> None:
        self.link.publish(topics.command_topic(FLEET, device), encode(command), qos=1)

    def deploy(self, device: str, signed: SignedManifest, *, job_id: str, expires_in: float = 600) -> None:
        now = datetime.now(UTC)
        self.send(
            device,
            DeployCommand(
                job_id=job_id, issued_at=now, expires_at=now + timedelta(seconds=expires_in), manifest=signed
            ),
        )

    def last_event(self, device: str, job_id: str) -> JobEvent | None:
        matching = [e for e in self.events[device] if e.job_id == job_id]
        return matching[-1] if matching else None

    def wait_final(self, device: str, job_id: str, *, timeout: float = 20.0, states: tuple[str, ...] = ()) -> JobEvent:
        wanted = states or ("active", "failed", "rolled_back")

        def done() -> bool:
            event = self.last_event(device, job_id)
            return event is not None and event.state.value in wanted and not _in_probation(event)

        assert self.reactor.run(until=done, timeout=timeout), (
            f"{device} job {job_id}: no final event, saw {[(e.state, e.result) for e in self.events[device]]}"
        )
        event = self.last_event(device, job_id)
        assert event is not None
        return event


def _in_probation(event: JobEvent) -> bool:
    return event.state.value == "active" and event.detail != "probation passed"


def agent_config(data_dir: Path, device: str, host: str, port: int, keys: Keys, **overrides: Any) -> AgentConfig:
    base = AgentConfig(
        fleet=FLEET,
        device_id=device,
        profile=PROFILE,
        data_dir=data_dir / device,
        host=host,
        port=port,
        trusted_keys=keys.trusted,
        telemetry_window_s=3600.0,
        request_timeout_s=0.5,
        request_timeout_max_s=2.0,
        max_request_attempts=5,
        probation_s=0.3,
        durable=False,
        faults=Faults(),
    )
    return replace(base, **overrides)


@dataclass
class Fleet:
    """A reactor, a controller and helpers to start agents against one broker."""

    reactor: Reactor
    controller: Controller
    tmp: Path
    host: str
    port: int
    keys: Keys
    agents: dict[str, Agent] = field(default_factory=dict)

    def start_agent(self, device: str, **overrides: Any) -> Agent:
        agent = Agent(
            agent_config(self.tmp, device, self.host, self.port, self.keys, **overrides), reactor=self.reactor
        )
        agent.start()
        assert self.reactor.run(until=lambda: agent.link.connected, timeout=10), f"{device} did not connect"
        self.reactor.run(timeout=0.1)
        self.agents[device] = agent
        return agent

    def run_until(self, predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
        return self.reactor.run(until=predicate, timeout=timeout)


@contextmanager
def fleet_on(tmp_path: Path, host: str, port: int, keys: Keys, *, session_expiry_s: int = 0) -> Iterator[Fleet]:
    reactor = Reactor()
    controller = Controller(reactor, host, port, session_expiry_s=session_expiry_s)
    fleet = Fleet(reactor, controller, tmp_path, host, port, keys)
    try:
        yield fleet
    finally:
        for agent in fleet.agents.values():
            agent.stop()
        controller.link.disconnect()
        reactor.run(timeout=0.05)
        for agent in fleet.agents.values():
            agent.link.close()
        controller.link.close()
        reactor.close()
