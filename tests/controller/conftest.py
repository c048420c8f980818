"""Fixtures for the controller tests: a temporary edgefleet home, a CLI runner, a tiny ONNX model, databases."""

from __future__ import annotations

import datetime as dt
import json
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefleet.controller.cli.main import app
from edgefleet.controller.data.db import Database
from edgefleet.protocols.codec import encode
from edgefleet.protocols.messages import Birth, Capabilities, DeviceState, JobEvent, RunningModel, SlotState, Status
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, TelemetryBatch, bucket_index

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "deploy" / "profiles"
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def make_onnx(path: Path, *, inputs: int = 4, outputs: int = 3, opset: int = 17) -> Path:
    """A tiny linear model: y = x @ W + b."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((inputs, outputs)).astype("float32"), "W")
    bias = numpy_helper.from_array(np.zeros(outputs, dtype="float32"), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    return make_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def onnx_factory() -> Callable[..., Path]:
    """make_onnx(path, inputs=4, outputs=3, opset=17) for tests that need several models."""
    return make_onnx


@pytest.fixture
def profiles() -> Path:
    """deploy/profiles, the shipped device profiles."""
    return PROFILES


class Cli:
    """Runs `edgefleet` in-process against one temporary home; returns typer's Result."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.runner = CliRunner()

    def __call__(self, *args: str, stdin: str | None = None) -> Any:
        return self.runner.invoke(app, [str(a) for a in args], env=self.env, input=stdin, catch_exceptions=False)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}"
        return str(result.stdout)

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    env = {"EDGEFLEET_HOME": str(home), "EDGEFLEET_DB_TIMEOUT": "1"}
    return Cli(home, env)


@pytest.fixture
def ready(cli: Cli) -> Cli:
    """A home with the rpi4 and x86-gateway classes."""
    cli.ok("init")
    cli.ok("class", "add", "rpi4", "--profile", str(PROFILES / "rpi4.toml"))
    cli.ok("class", "add", "x86-gateway", "--profile", str(PROFILES / "x86-gateway.toml"))
    return cli


def postgres_answers() -> bool:
    from edgefleet.controller.broker.mosquitto import port_answers

    return port_answers("127.0.0.1", 5432)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated registry database: SQLite always, PostgreSQL (own schema, dropped after) where one answers."""
    if request.param == "sqlite":
        db = Database.open(f"sqlite:///{tmp_path / 'registry.db'}", timeout=1)
        db.migrate()
        yield db
        db.dispose()
        return
    if not postgres_answers():
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432 (database test, user postgres)")
    schema = f"ef_test_{uuid.uuid4().hex[:12]}"
    db = Database.open(POSTGRES_URL, timeout=3, schema=schema)
    db.migrate()
    try:
        yield db
    finally:
        db.dispose()
        admin = Database.open(POSTGRES_URL, timeout=3)
        with admin.engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


Factory = Callable[..., Any]


# ---------------------------------------------------------------- valid device messages
# Recent enough to stay inside the rollup retention, on a whole minute so windows are predictable.
T0 = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(hours=1)


def telemetry(
    seq: int,
    *,
    latencies: tuple[float, ...] = (0.002, 0.004),
    labelled: int = 0,
    correct: int = 0,
    model_version: int | None = 1,
    model_name: str | None = "tiny",
    digest: str | None = None,
    confidence: float | None = None,
    errors: dict[str, int] | None = None,
    session: str = "s1",
    start: dt.datetime = T0,
) -> bytes:
    counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
    for value in latencies:
        counts[bucket_index(value)] += 1
    batch = TelemetryBatch.model_validate(
        {
            "session": session,
            "seq": seq,
            "window_start": start,
            "window_end": start + dt.timedelta(seconds=10),
            "model_name": model_name,
            "model_version": model_version,
            "model_digest": digest,
            "inference_count": len(latencies),
            "latency_counts": tuple(counts),
            "latency_sum_seconds": sum(latencies),
            "labelled_count": labelled,
            "correct_count": correct,
            "mean_top1_confidence": confidence,
            "errors": errors or {},
        }
    )
    return encode(batch)


def birth(
    *, device_class: str = "rpi4", fleet: str = "default", version: int | None = None, when: dt.datetime = T0
) -> bytes:
    running = RunningModel(name="tiny", digest="a" * 64, version=version) if version else None
    return encode(
        Birth.model_validate(
            {
                "agent_version": "0.1.0",
                "device_class": device_class,
                "fleet": fleet,
                "capabilities": Capabilities(
                    onnxruntime_version="1.17.0",
                    opset=17,
                    cpu_count=4,
                    ram_bytes=2**30,
                    threads=4,
                    int8_dot_product=False,
                ),
                "running": running,
                "slots": SlotState(active="a", a=running) if running else SlotState(),
                "timestamp": when,
            }
        )
    )


def status(state: str, *, when: dt.datetime = T0) -> bytes:
    return encode(Status(state=DeviceState(state), timestamp=when))


def job_event(job_id: str, state: str, *, result: int = 0, version: int | None = None) -> bytes:
    return encode(
        JobEvent.model_validate(
            {"job_id": job_id, "state": state, "result": result, "timestamp": T0, "model_version": version}
        )
    )


@pytest.fixture
def wire() -> types.SimpleNamespace:
    """Builders of valid device payloads: wire.telemetry(seq, ...), wire.birth(...), wire.status(...), ..."""
    return types.SimpleNamespace(telemetry=telemetry, birth=birth, status=status, job_event=job_event, T0=T0)


@pytest.fixture
def serving_home() -> Callable[..., tuple[str, Any]]:
    """`serving_home(cli, broker, onnx, devices=N, artifacts=K)`: see `_serving_home`."""
    return _serving_home


def _serving_home(cli: Cli, broker: Any, onnx: Path, *, devices: int, artifacts: int) -> tuple[str, Any]:
    """A home with a fleet of its own on `broker` (unique ids: the broker may be shared): class rpi4, `devices`
    registered as FLEET-00000..., model `tiny` signed `artifacts` times. Returns the fleet and the controller's
    settings (a free metrics port, a fast flush)."""
    import dataclasses

    from edgefleet.controller.broker.mosquitto import free_port
    from edgefleet.controller.config import load_settings

    fleet = f"f{uuid.uuid4().hex[:10]}"
    cli.env.update(
        {"EDGEFLEET_FLEET": fleet, "EDGEFLEET_MQTT_HOST": broker.host, "EDGEFLEET_MQTT_PORT": str(broker.port),
         "EDGEFLEET_MQTT_CLIENT_ID": f"ctl-{fleet}"}
    )  # fmt: skip
    cli.ok("init")
    cli.ok("class", "add", "rpi4", "--profile", str(PROFILES / "rpi4.toml"))
    cli.ok("device", "register", "--class", "rpi4", *[f"--id={fleet}-{i:05d}" for i in range(devices)])
    cli.ok("model", "add", "tiny", "--onnx", str(onnx))
    for _ in range(artifacts):
        cli.ok("artifact", "add", "tiny", "--class", "rpi4")
    settings = load_settings(flags={"home": cli.home}, env=cli.env)
    return fleet, dataclasses.replace(settings, metrics_port=free_port(), flush_interval_s=0.1)
