"""Telemetry ingest: the controller's full path against a raw paho subscriber, on the same QoS 1 stream.

In one run: a managed Mosquitto with edgefleet's tuned settings; several publishing processes, each playing
many devices, send valid QoS 1 telemetry batches. (a) a bare paho subscriber (MQTT 5, QoS 1) counts them; (b) the
controller (`ControllerApp`: parse the topic, validate with pydantic, check the device, merge into the
Prometheus histogram, aggregate rollups, persist them to SQLite in batched transactions) ingests the same
stream. The clock runs from the publishers' start signal to the last message received (a) or recorded in the
database (b). Zero loss is checked: the rollup rows must add up to the messages sent.

    .venv/bin/python benchmarks/telemetry_ingest.py [--messages 60000] [--publishers 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry
from sqlalchemy import func
from sqlmodel import select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from edgefleet.controller.broker.mosquitto import ManagedMosquitto
from edgefleet.controller.config import Settings
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import TelemetryRollup, utcnow
from edgefleet.controller.service.app import ControllerApp
from edgefleet.controller.service.handlers import ControllerService
from edgefleet.controller.service.metrics import ControllerMetrics
from edgefleet.protocols.codec import encode
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, TelemetryBatch, bucket_index
from edgefleet.protocols.topics import controller_filters, telemetry_topic

FLEET = "bench"
DEVICES_PER_PUBLISHER = 50
PROFILE = Path(__file__).resolve().parent.parent / "deploy" / "profiles" / "rpi4.toml"


def device_ids(publisher: int) -> list[str]:
    return [f"p{publisher}-d{i:03d}" for i in range(DEVICES_PER_PUBLISHER)]


def payloads(publisher: int, count: int, session: str) -> list[tuple[str, bytes]]:
    """`count` valid telemetry batches, round-robin over this publisher's devices, seq growing per device."""
    start = utcnow().replace(microsecond=0)
    devices = device_ids(publisher)
    out = []
    for n in range(count):
        device = devices[n % len(devices)]
        latencies = (0.0008 + (n % 7) * 0.0004, 0.003)
        counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
        for value in latencies:
            counts[bucket_index(value)] += 1
        batch = TelemetryBatch.model_validate(
            {
                "session": session,
                "seq": n // len(devices),
                "window_start": start,
                "window_end": start,
                "model_name": "tiny",
                "model_version": 1,
                "inference_count": 2,
                "latency_counts": counts,
                "latency_sum_seconds": sum(latencies),
                "labelled_count": 1,
                "correct_count": n % 2,
                "mean_top1_confidence": 0.9,
            }
        )
        out.append((telemetry_topic(FLEET, device), encode(batch)))
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def publish_worker(port: int, publisher: int, count: int, session: str, ready: Any, go: Any) -> None:  # noqa: PLR0917
    """One publishing process playing many devices over one MQTT 3.1.1 connection.

    The packets are built before the start signal and written with plain sockets, so the publishers spend
    their CPU on almost nothing and the subscribers under test get the machine. PUBACKs are read and counted.
    """
    messages = payloads(publisher, count, session)
    connect = _packet(0x10, _string("MQTT") + bytes([4, 0x02, 0, 60]) + _string(f"bench-pub-{publisher}-{session}"))
    stream = b"".join(
        _packet(0x32, _string(topic) + ((i % 65535) + 1).to_bytes(2, "big") + payload)
        for i, (topic, payload) in enumerate(messages)
    )
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect)
        if sock.recv(4) != b"\x20\x02\x00\x00":
            raise SystemExit("the broker refused the publisher's CONNECT")
        acked = 0

        def read_acks() -> None:
            nonlocal acked
            while acked < 4 * count:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                acked += len(chunk)

        reader = threading.Thread(target=read_acks)
        reader.start()
        ready.wait()
        go.wait()
        sock.sendall(stream)
        reader.join(300)
        sock.sendall(b"\xe0\x00")  # DISCONNECT
    if acked < 4 * count:
        raise SystemExit(f"publisher {publisher}: {acked // 4} of {count} messages acknowledged")


@dataclasses.dataclass
class Stream:
    port: int
    publishers: int
    per_publisher: int

    @property
    def total(self) -> int:
        return self.publishers * self.per_publisher

    def run(self, session: str) -> float:
        """Start the publishers, release them together; returns the monotonic time of the release."""
        ctx = mp.get_context("spawn")
        ready, go = ctx.Barrier(self.publishers + 1), ctx.Event()
        procs = [
            ctx.Process(target=publish_worker, args=(self.port, i, self.per_publisher, session, ready, go))
            for i in range(self.publishers)
        ]
        for proc in procs:
            proc.start()
        ready.wait()
        self._procs = procs
        started = time.monotonic()
        go.set()
        return started

    def join(self) -> None:
        for proc in self._procs:
            proc.join(300)


def raw_subscriber(stream: Stream, session: str) -> float:
    """(a): a bare paho subscriber; messages per second from release to the last one received."""
    done = threading.Event()
    received = 0
    last = 0.0

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal received, last
        received += 1
        if received == stream.total:
            last = time.monotonic()
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{session}",
                         protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    client.connect("127.0.0.1", stream.port, clean_start=False, properties=props)
    client.subscribe([(f, 1) for f in controller_filters(FLEET)])
    client.loop_start()
    time.sleep(0.5)
    started = stream.run(session)
    if not done.wait(300):
        raise SystemExit(f"raw subscriber got {received} of {stream.total} messages")
    stream.join()
    client.disconnect()
    client.loop_stop()
    return stream.total / (last - started)


def controller_ingest(stream: Stream, session: str, home: Path) -> tuple[float, int]:
    """(b): the controller's full ingest; messages per second from release until all are in the database."""
    settings = Settings(home=home, mqtt_port=stream.port, fleet=FLEET, mqtt_client_id=f"bench-ctl-{session}",
                        flush_interval_s=0.2, flush_every=5000)  # fmt: skip
    app = ControllerApp(settings, registry=CollectorRegistry())
    before = app.service.rollups.recorded_messages
    app.start(metrics_server=False)
    time.sleep(0.5)
    started = stream.run(session)
    deadline = time.monotonic() + 300
    while app.service.rollups.recorded_messages - before < stream.total and time.monotonic() < deadline:
        time.sleep(0.05)
    finished = time.monotonic()
    stream.join()
    app.stop()
    with app.db.reading() as session_:
        recorded = int(session_.exec(select(func.sum(TelemetryRollup.messages))).one() or 0)
    return stream.total / (finished - started), recorded


def handler_only(home: Path, publishers: int, per_publisher: int, session: str) -> float:
    """(c): the controller's ingest code alone on the same payloads, in-process, no network; includes the flush."""
    db = Database.open(f"sqlite:///{home / 'registry.db'}")
    service = ControllerService(db, metrics=ControllerMetrics(registry=CollectorRegistry()), fleet=FLEET)
    messages = [m for p in range(publishers) for m in payloads(p, per_publisher, session)]
    started = time.perf_counter()
    for topic, payload in messages:
        service.handle(topic, payload)
    service.flush()
    elapsed = time.perf_counter() - started
    db.dispose()
    return len(messages) / elapsed


def prepare(home: Path, publishers: int) -> None:
    db = Database.open(f"sqlite:///{home / 'registry.db'}")
    db.migrate()
    registry = Registry(db)
    registry.ensure_fleet(FLEET)
    registry.add_class(load_profile(PROFILE))
    ids = [d for p in range(publishers) for d in device_ids(p)]
    registry.register_devices(ids, class_name="rpi4", fleet=FLEET)
    db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=60_000, help="messages per run, all publishers together")
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ef-bench-") as tmp:
        home = Path(tmp) / "home"
        prepare(home, args.publishers)
        home_c = Path(tmp) / "home-c"  # (c) writes its own rollups, apart from the ones (b) is checked on
        prepare(home_c, args.publishers)
        with ManagedMosquitto(Path(tmp) / "broker") as broker:
            stream = Stream(broker.port, args.publishers, args.messages // args.publishers)
            raw, ingest, alone, recorded_total = [], [], [], 0
            for r in range(args.repeats):
                raw.append(raw_subscriber(stream, f"a{r}"))
                rate, recorded = controller_ingest(stream, f"b{r}", home)
                ingest.append(rate)
                recorded_total = recorded
                alone.append(handler_only(home_c, args.publishers, stream.per_publisher, f"c{r}"))
                print(
                    f"run {r + 1}: raw paho {raw[-1]:,.0f} msg/s, controller {rate:,.0f} msg/s, "
                    f"ingest code alone {alone[-1]:,.0f} msg/s",
                    flush=True,
                )
    sent = stream.total * args.repeats
    raw_med, ingest_med = statistics.median(raw), statistics.median(ingest)
    lost = sent - recorded_total
    runs = tuple(", ".join(f"{x:,.0f}" for x in xs) for xs in (raw, ingest, alone))
    verdict = "met" if ingest_med >= 10_000 else "NOT met on this machine"
    lines = [
        (
            f"{args.publishers} publishing processes x {DEVICES_PER_PUBLISHER} devices each send {stream.total:,} "
            f"QoS 1 telemetry batches per run to a managed Mosquitto (tuned settings); {args.repeats} runs, medians."
        ),
        "",
        "| subscriber | messages/s (median) | runs |",
        "|---|---:|---|",
        f"| (a) raw paho subscriber (MQTT 5, QoS 1), counting only | {raw_med:,.0f} | {runs[0]} |",
        (
            "| (b) controller: topic + pydantic validation + device check + metrics + rollups persisted "
            f"(SQLite WAL) | {ingest_med:,.0f} | {runs[1]} |"
        ),
        (
            "| (c) the controller's ingest code alone, in-process, same payloads (no MQTT), flush included | "
            f"{statistics.median(alone):,.0f} | {runs[2]} |"
        ),
        "",
        f"- controller / raw paho: **{ingest_med / raw_med:.0%}** (target >= 50%)",
        f"- controller >= 10,000 msg/s: {verdict} (load average at the end: {os.getloadavg()[0]:.1f})",
        f"- messages sent to the controller: {sent:,}; recorded in rollups: {recorded_total:,}; lost: {lost}",
        (
            "- clock: from the publishers' common start signal to the last message received (a) or recorded in "
            "the database (b); publishers (pre-encoded packets on plain sockets), broker and subscriber share "
            "this machine's CPUs."
        ),
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("telemetry_ingest", "Telemetry ingest (controller vs raw paho)", body)
    if lost:
        raise SystemExit(f"{lost} messages lost")


if __name__ == "__main__":
    main()
