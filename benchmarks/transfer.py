"""Artifact transfer: edgefleet's block transfer against raw paho chunks, and one broadcast for many devices.

In one run, on a managed Mosquitto (edgefleet's tuned settings) on 127.0.0.1:

1. raw: a paho publisher (`loop_start`, in a process of its own) sends the artifact in block-sized QoS 0 chunks
   to a paho subscriber in this process; the clock runs from the first publish to the last chunk received. This is
   what a user would write by hand.
2. edgefleet, one device: the controller's `BlockServer` on the controller's `MqttClient` (in a process of its
   own, as a controller runs apart from its devices) and one `Agent` here (durable, fsyncs per stretch, as on a
   real device; and non-durable, as simulated devices run); the clock runs from the deploy command to the last
   block on disk, every block checked against the signed manifest. Both at each `--block-kib` size.
3. N simulated devices (100 and 1,000, one process, one selector loop) fetch the same 1 MB artifact at once:
   time until all hold it, until all run it, and bytes the controller published divided by the artifact size.

    .venv/bin/python benchmarks/transfer.py [--size-mb 32] [--repeats 5] [--block-kib 32,128] [--fleet-sizes 100,1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as paho
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.machine import Event
from edgefleet.agent.reactor import Reactor
from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
from edgefleet.agent.updater import Updater
from edgefleet.controller.broker.mosquitto import ManagedMosquitto
from edgefleet.controller.service.blockserver import BlockServer
from edgefleet.controller.service.mqtt import MqttClient
from edgefleet.protocols import topics
from edgefleet.protocols.codec import encode
from edgefleet.protocols.commands import DeployCommand
from edgefleet.protocols.manifest import InlineTensor, Manifest, SignedManifest, TensorSpec, ValidationSample
from edgefleet.protocols.manifest import block_digests as digests
from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes
from edgefleet.protocols.signing import generate_keypair, key_id, sign_manifest

FLEET = "bench"
ACK_EVERY = 8  # as BlockServing: one QoS 1 block in 8 carries the acknowledgement for the others
_SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads forked half-way
BLOCK = 32 * 1024
# Simulated devices keep their data in RAM where it can: on ext4 each rename-over (state file, bitmap) flushes
# data (auto_da_alloc) and costs ~1 ms, which would measure the disk of one host, not the transfer.
SHM = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108 - a private mkdtemp under it, removed after


def profile(block_size: int = BLOCK) -> DeviceProfile:
    return DeviceProfile(
        name="benchbox",
        storage_budget_bytes=64 * 2**20,
        ram_budget_bytes=2**30,
        latency_budget_ms=50.0,
        threads=1,
        int8_dot_product=False,
        block_size_bytes=block_size,
        reference_ms=ReferenceTimes(fp32_conv=1.0, fp32_matmul=1.0, int8_conv=1.0, int8_matmul=1.0),
    )


def padded_model(size: int, *, seed: int = 0) -> bytes:
    """A 4 -> 8 -> 3 MLP padded with an unused initializer to about `size` bytes (a valid ONNX file)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.integers(0, 255, size=max(0, size - 400), dtype=np.uint8), "pad"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def signed_manifest(model: bytes, private: bytes, public: bytes, *, block_size: int = BLOCK) -> SignedManifest:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    x = np.ones((1, 4), dtype=np.float32)
    y = session.run(None, {"x": x})[0]
    sample = ValidationSample(
        inputs={"x": InlineTensor.from_bytes(x.tobytes(), dtype="float32", shape=x.shape)},
        expected={"y": InlineTensor.from_bytes(y.astype("<f4").tobytes(), dtype="float32", shape=y.shape)},
    )
    now = datetime.now(UTC)
    manifest = Manifest(
        artifact_name="bench",
        model_name="bench",
        device_class="benchbox",
        version=1,
        sha256=hashlib.sha256(model).hexdigest(),
        size_bytes=len(model),
        block_size=block_size,
        block_sha256=digests(model, block_size),
        created_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(hours=1),
        key_id=key_id(public),
        inputs=(TensorSpec(name="x", dtype="float32", shape=("N", 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("N", 3)),),
        validation_samples=(sample,),
        opset=13,
        min_onnxruntime_version="1.16",
    )
    return sign_manifest(manifest, private)


# ------------------------------------------------------------------------------------------------ raw paho
def _raw_publisher(conn: Connection, host: str, port: int, path: str, chunk: int) -> None:
    """The raw sender, in a process of its own (as the controller is): publishes the chunks when told "go"."""
    data = Path(path).read_bytes()
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-pub", protocol=MQTTProtocolVersion.MQTTv5)
    pub.connect(host, port)
    pub.loop_start()
    conn.send("ready")
    while conn.recv() == "go":
        for payload in chunks:
            pub.publish("raw/chunks", payload, qos=0)
    pub.disconnect()
    pub.loop_stop()


def raw_paho_seconds(host: str, port: int, path: Path, chunk: int) -> float:
    count = -(-path.stat().st_size // chunk)
    done = threading.Event()
    received = [0]

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        received[0] += 1
        if received[0] == count:
            done.set()

    subscribed = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-sub", protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(host, port)
    sub.subscribe("raw/chunks", qos=0)
    sub.loop_start()
    conn, child = _SPAWN.Pipe()
    process = _SPAWN.Process(target=_raw_publisher, args=(child, host, port, str(path), chunk), daemon=True)
    process.start()
    try:
        if not (conn.poll(60) and conn.recv() == "ready" and subscribed.wait(5)):
            raise RuntimeError("raw paho: the publisher or the subscription did not come up")
        start = time.perf_counter()
        conn.send("go")
        ok = done.wait(60)
        elapsed = time.perf_counter() - start
    finally:
        conn.send("stop")
        process.join(10)
        sub.disconnect()
        sub.loop_stop()
    if not ok:
        raise RuntimeError(f"raw paho: only {received[0]}/{count} chunks arrived")
    return elapsed


class Controller:
    """The controller's own block path: a `BlockServer` on its sending thread, publishing through the controller's
    `MqttClient` (paho's network thread) with QoS 1 and a real in-flight window, as `BlockServing` wires it."""

    def __init__(self, host: str, port: int, artifacts: dict[str, Path], **server: object) -> None:
        self.client = MqttClient(
            host=host,
            port=port,
            client_id=f"bench-ctl-{time.monotonic_ns()}",
            on_message=self._on_message,
            subscriptions=topics.controller_filters(FLEET),
            session_expiry_s=0,
        )
        self.server = BlockServer(
            self._publish,
            artifacts.get,
            **{"qos": 1, "ack_every": ACK_EVERY, **server},  # type: ignore[arg-type]
        )
        self.client.connect(timeout=10)
        time.sleep(0.2)  # the SUBACK
        self.server.start()

    def _publish(self, topic: str, payload: bytes, qos: int) -> int | None:
        if self.server.tracks(qos):
            return self.client.publish_tracked(topic, payload, qos=qos, on_done=self.server.on_published)
        self.client.publish(topic, payload, qos=qos, timeout=None)
        return None

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topics.parse_topic(topic).kind is topics.TopicKind.BLOCK_REQUEST:
            self.server.handle_request(topic, payload)

    def deploy(self, devices: list[str], signed: SignedManifest, job: str) -> None:
        now = datetime.now(UTC)
        command = encode(DeployCommand(job_id=job, issued_at=now, expires_at=now + timedelta(hours=1), manifest=signed))
        for device in devices:
            self.client.publish(topics.command_topic(FLEET, device), command, qos=1, timeout=None)

    def close(self) -> None:
        self.server.stop()
        self.client.close()


def _controller_process(
    conn: Connection, host: str, port: int, artifacts: dict[str, str], server: dict[str, Any]
) -> None:
    controller = Controller(host, port, {k: Path(v) for k, v in artifacts.items()}, **server)
    conn.send("ready")
    while True:
        message = conn.recv()
        if message[0] == "deploy":
            controller.deploy(*message[1:])
        else:
            controller.close()
            conn.send(dataclasses.asdict(controller.server.stats))
            return


class RemoteController:
    """A `Controller` in a process of its own, as a controller runs apart from its devices (no shared GIL)."""

    def __init__(self, host: str, port: int, artifacts: dict[str, Path], **server: Any) -> None:
        self._conn, child = _SPAWN.Pipe()
        paths = {k: str(v) for k, v in artifacts.items()}
        self._process = _SPAWN.Process(target=_controller_process, args=(child, host, port, paths, server), daemon=True)
        self._process.start()
        if not (self._conn.poll(60) and self._conn.recv() == "ready"):
            self._process.kill()
            raise RuntimeError("the controller process did not come up")

    def deploy(self, devices: list[str], signed: SignedManifest, job: str) -> None:
        self._conn.send(("deploy", devices, signed, job))

    def close(self) -> dict[str, int]:
        """Stop it; the block server's counters."""
        self._conn.send(("stop",))
        stats: dict[str, int] = self._conn.recv() if self._conn.poll(30) else {}
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
        return stats


def downloaded(agent: Agent) -> bool:
    return agent.updater.record.state.value not in {"idle", "downloading"}


def one_device_seconds(host: str, port: int, model: Path, signed: SignedManifest, keys: dict[str, bytes],
                       *, durable: bool, workdir: Path, block_size: int = BLOCK) -> float:  # fmt: skip
    reactor = Reactor()
    # one device: no one to wait for, so no coalescing wait (the default 0.5 s quiet time is latency, not throughput)
    controller = RemoteController(
        host, port, {signed.manifest.sha256: model}, rate_limit_bytes_per_s=None, coalesce_s=0.0
    )
    config = AgentConfig(fleet=FLEET, device_id=f"one-{time.monotonic_ns()}", profile=profile(block_size),
                         data_dir=workdir,
                         host=host, port=port, trusted_keys=keys, durable=durable, telemetry_window_s=3600)  # fmt: skip
    agent = Agent(config, reactor=reactor)
    agent.start()
    reactor.run(until=lambda: agent.link.connected, timeout=10)
    reactor.run(timeout=0.2)
    # the clock stops when the last block is on disk (the move to verifying), not when the loop next looks
    done_at: list[float] = []
    move = Updater.move

    def timed_move(self: Updater, event: Event, **kwargs: Any) -> None:
        if self is agent.updater and event is Event.DOWNLOADED and not done_at:
            done_at.append(time.perf_counter())
        move(self, event, **kwargs)

    Updater.move = timed_move  # type: ignore[method-assign]
    start = time.perf_counter()
    controller.deploy([config.device_id], signed, "job-one")
    try:
        if not reactor.run(until=lambda: downloaded(agent), timeout=120) or not done_at:
            raise RuntimeError("edgefleet single-device transfer did not finish in 120 s")
    finally:
        Updater.move = move  # type: ignore[method-assign]
    elapsed = done_at[0] - start
    reactor.run(until=lambda: agent.updater.record.state.value == "active", timeout=30)
    agent.stop()
    controller.close()
    agent.link.close()
    reactor.close()
    return elapsed


def fleet_run(host: str, port: int, n: int, *, model: Path, signed: SignedManifest, keys: dict[str, bytes],
              workdir: Path, coalesce_s: float, coalesce_max_s: float,
              holdoff_s: float, busy_ms: float = 0.0) -> dict[str, float]:  # fmt: skip
    """`busy_ms`: extra time each simulated device's loop spends per block message (a busier, slower host)."""
    handle = Agent._on_message

    def busy_on_message(agent: Agent, topic: str, payload: bytes) -> None:
        time.sleep(busy_ms / 1000)
        handle(agent, topic, payload)

    if busy_ms > 0:
        Agent._on_message = busy_on_message  # type: ignore[method-assign,assignment]
    try:
        return _fleet_run(host, port, n, model=model, signed=signed, keys=keys, workdir=workdir,
                          coalesce_s=coalesce_s, coalesce_max_s=coalesce_max_s, holdoff_s=holdoff_s) | {
            "busy_ms": busy_ms}  # fmt: skip
    finally:
        Agent._on_message = handle  # type: ignore[method-assign]


def _fleet_run(host: str, port: int, n: int, *, model: Path, signed: SignedManifest, keys: dict[str, bytes],
               workdir: Path, coalesce_s: float, coalesce_max_s: float,
               holdoff_s: float) -> dict[str, float]:  # fmt: skip
    reactor = Reactor()
    controller = RemoteController(
        host, port, {signed.manifest.sha256: model},
        rate_limit_bytes_per_s=None, max_inflight=64, coalesce_s=coalesce_s, coalesce_max_s=coalesce_max_s,
        resend_holdoff_s=holdoff_s,
    )  # fmt: skip
    spec = SimulatorSpec(devices=n, profile=profile(), data_root=workdir, fleet=FLEET, host=host, port=port,
                         id_prefix=f"f{n}-{time.monotonic_ns() % 100000}", trusted_keys=keys,
                         telemetry_window_s=3600, probation_s=0.5, connect_rate_per_s=2000)  # fmt: skip
    sim = FleetSimulator(spec, reactor=reactor)
    sim.start()
    if not sim.run(duration=120, until=lambda: sim.connected == n):
        raise RuntimeError(f"only {sim.connected}/{n} simulated devices connected")
    reactor.run(timeout=0.5)
    start = time.perf_counter()
    controller.deploy([spec.device_id(i) for i in range(n)], signed, "job-fleet")
    ok = sim.run(duration=300, until=lambda: all(downloaded(a) for a in sim.agents))
    t_have = time.perf_counter() - start
    sim.run(duration=120, until=lambda: all(a.updater.record.state.value == "active" for a in sim.agents))
    t_active = time.perf_counter() - start
    active = sum(a.updater.record.state.value == "active" for a in sim.agents)
    sim.stop()
    stats = controller.close()
    result = {
        "devices": n,
        "holdoff_s": holdoff_s,
        "complete": float(ok),
        "all_have_s": t_have,
        "all_active_s": t_active,
        "published_ratio": stats["bytes_sent"] / signed.manifest.size_bytes,
        "requests": stats["requests"],
        "held_back": stats["held_back"],
        "late_resends": stats["late_resends"],
        "active": active,
    }
    reactor.close()
    return result


def _one_device_rows(results: dict[str, list[float]], block_kib: int, mb: float) -> tuple[list[str], float]:
    raw = statistics.median(results["raw"])
    spread = {k: f"{min(v):.3f}-{max(v):.3f}" for k, v in results.items()}
    rows = [f"| {block_kib} KiB | raw paho, QoS 0 chunks | {raw:.3f} | {spread['raw']} | {mb / raw:.1f} | 100% |"]
    ratio = 0.0
    for key, label in (("durable", "durable: fsync per 0.25 s stretch"), ("simulated", "simulated: no fsync")):
        t = statistics.median(results[key])
        ratio = max(ratio, raw / t) if key == "simulated" else ratio
        rows.append(
            f"| {block_kib} KiB | edgefleet, one device ({label}) | {t:.3f} | {spread[key]} | {mb / t:.1f} | "
            f"{raw / t:.0%} |"
        )
    return rows, ratio


def _fleet_label(f: dict[str, float]) -> str:
    busy = f" (+{f['busy_ms']:g} ms/block)" if f.get("busy_ms") else ""
    return f"{int(f['devices'])}{busy}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=32.0, help="artifact size for the one-device comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-kib", default="32,128", help="block (and raw chunk) sizes for the one-device runs")
    parser.add_argument("--fleet-sizes", default="100,1000")
    parser.add_argument("--coalesce-ms", type=float, default=3000.0, help="block server: quiet time before sending")
    parser.add_argument("--coalesce-max-s", type=float, default=30.0, help="block server: longest wait to send")
    parser.add_argument("--holdoff-s", default="3,30", help="block server resend holdoffs to compare (seconds)")
    parser.add_argument(
        "--busy-ms",
        type=float,
        default=0.5,
        help="one more run of the largest fleet, each device's loop this much "
        "slower per block (a loaded host); 0: none",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    sizes = [int(s) for s in args.fleet_sizes.split(",") if s]
    holdoffs = [float(h) for h in args.holdoff_s.split(",") if h]
    block_sizes = [int(k) * 1024 for k in args.block_kib.split(",") if k]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * max([*sizes, 1]) + 1024)), hard))
    private, public = generate_keypair()
    keys = {key_id(public): public}
    load_before = os.getloadavg()
    one: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name, tempfile.TemporaryDirectory(dir=SHM) as ram_name:
        tmp, ram = Path(tmp_name), Path(ram_name)
        broker = ManagedMosquitto(tmp / "mosquitto", extra_config=["max_connections -1"])
        broker.start()
        try:
            size = int(args.size_mb * 2**20)
            big = padded_model(size)
            big_path = tmp / "big.onnx"
            big_path.write_bytes(big)
            for block in block_sizes:
                signed = signed_manifest(big, private, public, block_size=block)
                runs: dict[str, list[float]] = {"raw": [], "durable": [], "simulated": []}
                for i in range(args.repeats):  # interleaved, so a busy spell on the host hits all three alike
                    runs["raw"].append(raw_paho_seconds(broker.host, broker.port, big_path, block))
                    for key in ("durable", "simulated"):
                        runs[key].append(
                            one_device_seconds(
                                broker.host,
                                broker.port,
                                big_path,
                                signed,
                                keys,
                                durable=key == "durable",
                                workdir=tmp / f"one-{block}-{key}-{i}",
                                block_size=block,
                            )
                        )
                one[block] = runs
            load_mid = os.getloadavg()
            small = padded_model(2**20, seed=1)
            small_path = tmp / "small.onnx"
            small_path.write_bytes(small)
            small_signed = signed_manifest(small, private, public)
            fleets = [
                fleet_run(
                    broker.host,
                    broker.port,
                    n,
                    model=small_path,
                    signed=small_signed,
                    keys=keys,
                    workdir=ram / f"fleet-{n}-{holdoff}",
                    coalesce_s=args.coalesce_ms / 1000,
                    coalesce_max_s=args.coalesce_max_s,
                    holdoff_s=holdoff,
                )
                for n in sizes
                for holdoff in holdoffs
            ]
            if args.busy_ms > 0 and sizes:
                fleets.append(
                    fleet_run(
                        broker.host,
                        broker.port,
                        max(sizes),
                        model=small_path,
                        signed=small_signed,
                        keys=keys,
                        workdir=ram / "fleet-busy",
                        coalesce_s=args.coalesce_ms / 1000,
                        coalesce_max_s=args.coalesce_max_s,
                        holdoff_s=holdoffs[0],
                        busy_ms=args.busy_ms,
                    )
                )
        finally:
            broker.stop()
    load_after = os.getloadavg()
    mb = size / 2**20
    rows: list[str] = []
    verdicts: list[str] = []
    for block, runs in one.items():
        block_rows, ratio = _one_device_rows(runs, block // 1024, mb)
        rows += block_rows
        met = "met" if ratio >= 0.5 else "NOT met"
        verdicts.append(f"{block // 1024} KiB blocks: {ratio:.0%} of raw ({met})")
    fleet_rows = [
        f"| {_fleet_label(f)} | {f['holdoff_s']:.0f} | {int(f['active'])}/{int(f['devices'])} | "
        f"{f['all_have_s']:.2f} | {f['all_active_s']:.2f} | **{f['published_ratio']:.2f}** | {int(f['requests'])} | "
        f"{int(f['held_back'])} | {int(f['late_resends'])} |"
        for f in fleets
    ]
    worst = max((f["published_ratio"] for f in fleets), default=0.0)
    body = (
        f"One device ({mb:.0f} MiB artifact), median of {args.repeats} runs, raw and edgefleet runs interleaved. "
        "The sender runs in a process of its own in both cases (raw: a paho publisher with `loop_start`; edgefleet: "
        "the controller's `MqttClient` and `BlockServer`: a 64-block in-flight window, one block in 8 sent with QoS 1 "
        "to carry the broker's acknowledgement), "
        "the receiver in this process. Raw's clock runs from the first publish to the last chunk received; "
        "edgefleet's from the deploy command to the last block verified (per-block manifest hash) and on disk, "
        "with the block server's coalescing wait set to 0 (target: at least 50% of raw).\n\n"
        "| block | transfer | seconds (median) | runs (s) | MiB/s | of raw |\n|---|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n\n"
        f"One device, simulated (no fsync), ratio of medians: {'; '.join(verdicts)}. Each block costs edgefleet "
        "a fixed ~0.1 ms of Python at each end (paho's packet handling on both; the read, header and sha256 and "
        "the occasional acknowledgement on the controller; the topic and header checks, the sha256 against the "
        "manifest and the write on the device) where the raw subscriber only counts: larger blocks spread it over "
        "more bytes. The artifact is large enough for the transfer itself to dominate: the fixed start (the deploy "
        "command handled, its state persisted, the first request) is ~4 ms, and with an 8 MiB artifact (~20 ms "
        "raw) the ratio moved between 45% and 70% from run to run on this shared 2-CPU host (three runs of this "
        "code on 2026-11-29: 32 KiB 45%, 57%, 55%; 128 KiB 54%, 70%, 45%).\n\n"
        f"Many devices (one process, one selector loop, data in {SHM or 'the temp dir'}) fetching the same 1 MiB "
        f"artifact in {BLOCK // 1024} KiB blocks; the controller in a process of its own; the block server starts "
        f"once requests have been quiet for {args.coalesce_ms:.0f} ms (at most {args.coalesce_max_s:.0f} s), no "
        "rate limit. Published/size counts every byte the controller sent, block headers included (target: at most "
        "1.2, not N). Held back: block asks not acted on (the block was already queued, or sent to that device "
        "within the holdoff); late resends: blocks sent again at once for a device that asked first after they "
        "went out. The last row repeats the largest fleet with each simulated device's loop slowed by the given time "
        "per block message (a loaded host: the case where devices used to ask again for blocks still on their "
        "way).\n\n"
        "| devices | resend holdoff (s) | active | all hold it (s) | all active (s) | published / size "
        "| block requests | held back | late resends |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(fleet_rows)
        + "\n\n"
        f"Worst published/size: {worst:.2f} ({'met' if worst <= 1.2 else 'NOT met'}). A device asks again only "
        "after its quiet timeout has passed, the loop has read what was waiting on the sockets and nothing is "
        "left unread on its own connection (`Fetcher`), so a loop that is merely busy (1,000 devices in one Python "
        "thread) does not re-request blocks that are on their way; and the server does not resend a block to a "
        "device that was listening when it went out until the holdoff has passed.\n\n"
        f"Load average (1 min) before / after the one-device runs / at the end: {load_before[0]:.1f} / "
        f"{load_mid[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs shared with other jobs.\n"
    )
    print(body)
    if not args.no_write:
        write_section("transfer", "Artifact transfer (benchmarks/transfer.py)", body)


if __name__ == "__main__":
    main()
