"""kill -9 of the process running the rollout engine, twice, mid-rollout: after a restart it completes, no job twice.

The engine runs in a subprocess against a SQLite file and a real broker. The devices are played by this test: they
take the commands from the broker and answer through `apply_job_event` (what the controller's service does with a
job event), then report healthy telemetry.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlmodel import select

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import DeploymentJob, Device, RolloutDevice, TelemetryRollup
from edgefleet.controller.rollout.api import Rollouts
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.controller.service.state_updates import apply_job_event
from edgefleet.protocols.codec import decode_command
from edgefleet.protocols.commands import DeployCommand
from edgefleet.protocols.messages import JobEvent
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, bucket_index
from edgefleet.protocols.topics import parse_topic

pytestmark = pytest.mark.mqtt

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
ENGINE = """
import sys, time
from edgefleet.controller.data.db import Database
from edgefleet.controller.service.mqtt import MqttClient
from edgefleet.controller.rollout.engine import RolloutEngine
from edgefleet.controller.rollout.runner import RolloutRunner
url, host, port, client_id = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
db = Database.open(url, timeout=5)
mqtt = MqttClient(host=host, port=port, client_id=client_id, session_expiry_s=0)
mqtt.connect(timeout=10)
RolloutRunner(RolloutEngine(db, publisher=mqtt), interval_s=0.02).start()
while True:
    time.sleep(1)
"""


class Devices:
    """Answers every deploy command with `active` after a short delay and plants healthy telemetry."""

    def __init__(self, url: str, fleet: str, host: str, port: int) -> None:
        self.db = Database.open(url, timeout=10)
        self.jobs: dict[str, list[str]] = defaultdict(list)
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{fleet}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe(f"edgefleet/v1/{fleet}/device/+/cmd", qos=1)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, message: paho.MQTTMessage) -> None:
        command = decode_command(message.payload)
        device = parse_topic(message.topic).device
        assert isinstance(command, DeployCommand)
        assert device is not None
        with self.lock:
            self.jobs[device].append(command.job_id)
        threading.Timer(0.15, self._answer, args=(device, command.job_id)).start()

    def _answer(self, device: str, job_id: str) -> None:
        now = dt.datetime.now(dt.UTC)
        event = JobEvent(job_id=job_id, state="active", timestamp=now, model_version=2)  # type: ignore[arg-type]
        apply_job_event(self.db, device, event, now=now)
        counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
        counts[bucket_index(0.001)] = 40
        with self.db.transaction() as session:
            session.add(
                TelemetryRollup(
                    device_id=device, class_name="rpi4", model_version=2, window_start=now, window_seconds=60,
                    inferences=40, labelled=40, correct=39, latency_counts_json=json.dumps(counts),
                )
            )  # fmt: skip

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.db.dispose()


def _setup(db: Database, tmp: Path, onnx: Path, fleet: str, n: int) -> None:
    registry = Registry(db)
    registry.create_fleet(fleet)
    registry.add_class(load_profile(PROFILES / "rpi4.toml"))
    ids = [f"pi-{i:02d}" for i in range(n)]
    registry.register_devices(ids, class_name="rpi4", fleet=fleet)
    registry.add_model("tiny", source="test", task="classification")
    catalog = ArtifactCatalog(db, store=ArtifactStore(tmp / "store"), signing_key=Ed25519PrivateKey.generate())
    catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx)
    catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx)
    with db.transaction() as session:
        for device in session.exec(select(Device)).all():
            device.online, device.model_version = True, 1
            session.add(device)


def _rows(db: Database) -> list[RolloutDevice]:
    with db.reading() as session:
        return list(session.exec(select(RolloutDevice)).all())


def _wait(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_a_killed_engine_resumes_and_completes_without_doing_a_job_twice(
    mqtt_broker: object, tmp_path: Path, tiny_onnx: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    fleet = f"k{uuid.uuid4().hex[:10]}"
    db = Database.open(url, timeout=10)
    db.migrate()
    _setup(db, tmp_path, tiny_onnx, fleet, 15)
    gates = GateConfig(window_s=600, min_devices=1, min_samples=20, min_labelled=20)
    rollout = Rollouts(db).start("rpi4:2", plan=WavePlan(canary="1", growth=2, max_concurrent=3), gates=gates)
    host, port = mqtt_broker.host, mqtt_broker.port  # type: ignore[attr-defined]
    devices = Devices(url, fleet, host, port)
    log = (tmp_path / "engine.log").open("w")
    args = [sys.executable, "-c", ENGINE, url, host, str(port), f"ctl-{fleet}"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Kill it while wave 1, then wave 2, are in flight (some jobs created, some answered, some not).
        for wave in (1, 2):
            procs.append(subprocess.Popen(args, stdout=log, stderr=log))
            assert _wait(lambda w=wave: any(r.wave == w and r.state == "in_progress" for r in _rows(db)), 30)
            os.kill(procs[-1].pid, signal.SIGKILL)
            procs[-1].wait(10)
        assert Rollouts(db).get(rollout.id or 0).state == "running"
        procs.append(subprocess.Popen(args, stdout=log, stderr=log))
        assert _wait(lambda: Rollouts(db).get(rollout.id or 0).state == "completed", 60), (
            tmp_path / "engine.log"
        ).read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        log.close()
        devices.close()
    assert "Traceback" not in (tmp_path / "engine.log").read_text()
    rows = _rows(db)
    assert len(rows) == 15
    assert {r.state for r in rows} == {"active"}
    with db.reading() as session:
        jobs = list(session.exec(select(DeploymentJob)).all())
    assert len(jobs) == 15  # one job per device: nothing was created twice
    assert {j.state for j in jobs} == {"active"}
    for device, received in devices.jobs.items():
        assert len(set(received)) == 1, f"{device} got jobs {received}"  # resends carry the same job id
    db.dispose()
