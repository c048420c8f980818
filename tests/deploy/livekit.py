"""A real Prometheus on a free 127.0.0.1 port, and a scripted fleet that feeds a real controller over MQTT.

`PrometheusProcess` runs Debian's `prometheus` binary with a temporary storage directory, stops it by its own PID
and kills it if it does not stop. `ScriptedFleet` registers devices through the `edgefleet` CLI, starts a
`ControllerApp` (metrics endpoint on a free port, its rollout engine ticking) and publishes births, telemetry,
statuses, garbage and a block request with paho, the way devices do. It also gets a recompression proposal waiting
for approval (through `RecompressionLoop`, with a builder that records the next artifact) and a gated rollout whose
canary reports the new version with a latency, accuracy and error rate that breach its gates, so it pauses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as paho
import yaml
from deploykit import listen_port
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from typer.testing import CliRunner
from waiting import wait_for

from edgefleet.controller.cli.main import app as cli_app
from edgefleet.controller.config import load_settings
from edgefleet.controller.recompress.loop import BuildRequest, BuildResult, RecompressionLoop
from edgefleet.controller.recompress.policy import RecompressionPolicy
from edgefleet.controller.service.app import ControllerApp
from edgefleet.protocols.blocks import Bitmap, BlockRequest
from edgefleet.protocols.codec import encode
from edgefleet.protocols.messages import Birth, Capabilities, DeviceState, RunningModel, SlotState, Status
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, TelemetryBatch, bucket_index
from edgefleet.protocols.topics import (
    birth_topic,
    block_request_topic,
    status_topic,
    telemetry_topic,
)

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
RPI = [f"pi-{i}" for i in range(1, 4)]
GATEWAYS = [f"gw-{i}" for i in range(1, 6)]
GOING_OFFLINE = GATEWAYS[:4]  # 4 of 5 gateways drop: "devices going offline en masse"


class PrometheusProcess:
    """`prometheus` scraping the given targets every second, with the repo's rules evaluated every second."""

    def __init__(self, binary: str, workdir: Path, *, rules: Path, targets: list[str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = listen_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rules, self.targets = rules, targets
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    def _write_config(self) -> Path:
        # The shipped rules with their group intervals at 1 s, so a test sees recorded series in seconds.
        data = yaml.safe_load(self.rules.read_text(encoding="utf-8"))
        for group in data["groups"]:
            group["interval"] = "1s"
        rules = self.workdir / "rules.yml"
        rules.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "edgefleet-controller", "static_configs": [{"targets": self.targets}]}],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def start(self, *, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--query.lookback-delta=30s",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if not wait_for(self._ready, timeout=timeout):
            self.stop()
            raise RuntimeError(f"prometheus did not become ready: {self.log.read_text(errors='replace')[-2000:]}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:  # noqa: S310 - our own 127.0.0.1 URL
                return bool(response.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises on a PromQL error (Prometheus answers 400 with the reason)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own 127.0.0.1 URL
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"prometheus refused {expr!r}: {exc.read().decode(errors='replace')}") from exc
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def tiny_onnx(path: Path) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 3), dtype="float32"), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def birth(device_class: str, fleet: str, when: dt.datetime) -> bytes:
    running = RunningModel(name="tiny", digest="a" * 64, version=1)
    capabilities = Capabilities(
        onnxruntime_version="1.17.0", opset=17, cpu_count=4, ram_bytes=2**30, threads=4, int8_dot_product=False
    )
    return encode(
        Birth(
            agent_version="0.1.0",
            device_class=device_class,
            fleet=fleet,
            capabilities=capabilities,
            running=running,
            slots=SlotState(active="a", a=running),
            timestamp=when,
        )
    )


def telemetry(
    seq: int, *, latencies: tuple[float, ...], labelled: int, correct: int, errors: int, version: int = 1
) -> bytes:
    counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
    for value in latencies:
        counts[bucket_index(value)] += 1
    end = dt.datetime.now(dt.UTC)
    batch = TelemetryBatch.model_validate(
        {
            "session": "live",
            "seq": seq,
            "window_start": end - dt.timedelta(seconds=1),
            "window_end": end,
            "model_name": "tiny",
            "model_version": version,
            "inference_count": len(latencies),
            "latency_counts": tuple(counts),
            "latency_sum_seconds": sum(latencies),
            "labelled_count": labelled,
            "correct_count": correct,
            "mean_top1_confidence": 0.8,
            "errors": {"inference": errors} if errors else {},
        }
    )
    return encode(batch)


class ScriptedFleet:
    """A registry with two classes, a controller serving it, and paho publishing what devices would."""

    def __init__(self, workdir: Path, host: str, port: int) -> None:
        self.workdir, self.host, self.port = workdir, host, port
        self.fleet = f"d{uuid.uuid4().hex[:10]}"
        self.env = {
            "EDGEFLEET_HOME": str(workdir / "home"),
            "EDGEFLEET_FLEET": self.fleet,
            "EDGEFLEET_MQTT_HOST": host,
            "EDGEFLEET_MQTT_PORT": str(port),
            "EDGEFLEET_MQTT_CLIENT_ID": f"ctl-{self.fleet}",
            "EDGEFLEET_DB_TIMEOUT": "5",
        }
        self.app: ControllerApp | None = None
        self.client: paho.Client | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.artifact_sha256 = ""
        self.offline: set[str] = set()
        self.versions: dict[str, int] = {}  # model version a device reports in its telemetry (default 1)
        self.rollout_id = 0

    def cli(self, *args: str, exits: tuple[int, ...] = (0,)) -> str:
        result = CliRunner().invoke(cli_app, list(args), env=self.env, catch_exceptions=False)
        assert result.exit_code in exits, f"edgefleet {' '.join(args)}: {result.output}"
        return str(result.stdout)

    def register(self) -> None:
        self.cli("init")
        self.cli("class", "add", "rpi4", "--profile", str(PROFILES / "rpi4.toml"))
        self.cli("class", "add", "x86-gateway", "--profile", str(PROFILES / "x86-gateway.toml"))
        self.cli("device", "register", "--class", "rpi4", *(a for d in RPI for a in ("--id", d)))
        self.cli("device", "register", "--class", "x86-gateway", *(a for d in GATEWAYS for a in ("--id", d)))
        self.cli("model", "add", "tiny", "--onnx", str(tiny_onnx(self.workdir / "tiny.onnx")))
        # Measured accuracy 0.99: with rpi4's allowed drop it gives the artifacts an accuracy floor, which the
        # scripted rpi4 devices (2 of 3 labelled samples right) fall below.
        measured = '{"accuracy": 0.99}'
        added = self.cli("artifact", "add", "tiny", "--class", "rpi4", "--metrics", measured, "--json")
        self.artifact_sha256 = json.loads(added)["sha256"]
        self.cli("artifact", "add", "tiny", "--class", "rpi4", "--metrics", measured)  # version 2: the rollout's

    def start(self) -> str:
        """Start the controller; returns its metrics target host:port."""
        settings = dataclasses.replace(load_settings(env=self.env), metrics_port=listen_port(), flush_interval_s=0.2)
        # Its own recompression loop stays off: `propose_recompression` steps one with a stand-in builder.
        self.app = ControllerApp(settings, rollout_interval_s=0.5, recompress=False)
        self.app.start()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"devices-{self.fleet}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        self.cli("deploy", "rpi4:1", "--device", RPI[0])  # a deployment job: edgefleet_jobs{state}
        return f"127.0.0.1:{settings.metrics_port}"

    def publish(self, topic: str, payload: bytes) -> None:
        assert self.client is not None
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def births(self) -> None:
        now = dt.datetime.now(dt.UTC)
        for device in RPI:
            self.publish(birth_topic(self.fleet, device), birth("rpi4", self.fleet, now))
        for device in GATEWAYS:
            self.publish(birth_topic(self.fleet, device), birth("x86-gateway", self.fleet, now))
        request = BlockRequest.for_missing(self.artifact_sha256, Bitmap(1))
        self.publish(block_request_topic(self.fleet, RPI[0]), encode(request))

    def start_streaming(self) -> None:
        """Telemetry from every online device several times a second, and one garbage batch in five."""
        self._thread = threading.Thread(target=self._stream, name="scripted-telemetry", daemon=True)
        self._thread.start()

    def _stream(self) -> None:
        seq = 0
        while not self._stop.is_set():
            # rpi4 (2 ms budget): a p95 in the 10 ms bucket, far over it; the gateways (0.5 ms): within theirs.
            for device in RPI:
                version = self.versions.get(device, 1)
                payload = telemetry(
                    seq, latencies=(0.0012, 0.0018, 0.009), labelled=3, correct=2, errors=1, version=version
                )
                self.publish(telemetry_topic(self.fleet, device), payload)
            for device in (d for d in GATEWAYS if d not in self.offline):
                payload = telemetry(seq, latencies=(0.0002, 0.0003), labelled=2, correct=2, errors=0)
                self.publish(telemetry_topic(self.fleet, device), payload)
            self.publish(telemetry_topic(self.fleet, RPI[1]), b"{not telemetry")
            seq += 1
            self._stop.wait(0.25)

    def propose_recompression(self, *, timeout: float) -> int:
        """Run the recompression loop until the rpi4 class's slow p95 triggers a proposal; returns its id.

        The builder stands in for the compression worker: it records the class's next artifact with the CLI. The
        policy asks for approval, so the proposal stays pending (`edgefleet_recompression_pending`).
        """
        assert self.app is not None
        loop = RecompressionLoop(self.app.db, builder=self._build)
        policy = RecompressionPolicy(latency_windows=1, min_samples=10, accuracy=False, mode="approve")
        loop.set_policy("rpi4", policy)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            created = loop.step()
            if created:
                row = loop.get(created[0])
                assert row.state == "pending", f"recompression {row.id} is {row.state}: {row.note}"
                return created[0]
            time.sleep(0.3)
        raise AssertionError(f"no recompression was triggered within {timeout}s")

    def _build(self, request: BuildRequest) -> BuildResult:
        added = json.loads(self.cli("artifact", "add", request.model_name, "--class", request.class_name, "--json"))
        return BuildResult(artifact_id=int(added["id"]), report={"trigger": request.trigger})

    def start_rollout(self) -> int:
        """Roll version 2 out to rpi4 with a one-device canary; the canary reports v2 telemetry that breaches."""
        started = self.cli(
            "rollout", "start", "rpi4:2", "--canary", "1", "--window", "60", "--min-devices", "1",
            "--min-samples", "20", "--min-labelled", "10", "--accuracy-floor", "0.9", "--json",
        )  # fmt: skip
        view = json.loads(started)
        self.rollout_id = int(view["id"])
        # The canary is the first online device by id; it "took" the update and reports the new version.
        self.versions[RPI[0]] = 2
        return self.rollout_id

    def rollout_state(self) -> str:
        # `rollout status` exits with the outcome: 3 aborted, 4 paused
        shown = self.cli("rollout", "status", str(self.rollout_id), "--json", exits=(0, 3, 4))
        return str(json.loads(shown)["state"])

    def drop_gateways(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self.offline.update(GOING_OFFLINE)
        for device in GOING_OFFLINE:
            self.publish(status_topic(self.fleet, device), encode(Status(state=DeviceState.OFFLINE, timestamp=now)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.client is not None:
            self.client.loop_stop()
            with contextlib.suppress(Exception):
                self.client.disconnect()
        if self.app is not None:
            self.app.stop()
