"""End to end with the real agent: the controller app, the rollout engine and a simulated fleet on a real broker.

A first rollout gives six simulated devices version 1 (they download blocks, verify, validate, report telemetry);
a second rollout of version 2 breaches a latency gate set impossibly tight and aborts: the real agents roll back to
version 1 from their other slot.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import wait_for

from edgefleet.agent.replay import load_dataset
from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
from edgefleet.controller.artifacts.keys import load_signing_key, public_raw
from edgefleet.controller.rollout.api import Rollouts
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.controller.rollout.status import describe
from edgefleet.controller.service.app import ControllerApp
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.signing import key_id

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
N = 6


def test_real_agents_take_a_rollout_then_roll_back_an_aborted_one(
    cli, mqtt_broker, tmp_path: Path, tiny_onnx: Path, serving_home: Callable[..., tuple[str, Any]]
) -> None:
    fleet, settings = serving_home(cli, mqtt_broker, tiny_onnx, devices=N, artifacts=2)
    host, port = mqtt_broker.host, mqtt_broker.port
    # The controller as `edgefleet serve` runs it: its own rollout runner advances the rollouts.
    app = ControllerApp(settings, rollout_interval_s=0.2)
    app.start(metrics_server=False)
    stop = threading.Event()
    data = tmp_path / "replay.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(64, 4)).astype(np.float32), y=rng.integers(0, 3, size=64))
    public = public_raw(load_signing_key(settings.key_path))
    spec = SimulatorSpec(
        devices=N, profile=load_profile(PROFILES / "rpi4.toml"), data_root=tmp_path / "sim", fleet=fleet,
        host=host, port=port, id_prefix=fleet, trusted_keys={key_id(public): public},
        telemetry_window_s=0.5, probation_s=0.2, dataset=load_dataset(data), infer_fraction=1.0, infer_rate_hz=40.0,
    )  # fmt: skip
    sim = FleetSimulator(spec)
    simulating = threading.Thread(target=lambda: sim.run(until=stop.is_set))
    rollouts = Rollouts(app.db)
    try:
        sim.start()
        simulating.start()
        assert wait_for(lambda: sim.connected == N, 20)
        # A roomy latency ceiling: on a loaded 2-core test machine the simulated p95 (host time x 6) can pass 1.5 ms.
        gates = GateConfig(
            window_s=60, min_devices=2, min_samples=20, min_labelled=10, max_error_rate=0.5, latency_p95_ms=100.0
        )
        first = rollouts.start("rpi4:1", plan=WavePlan(canary="2", growth=2), gates=gates).id or 0
        assert wait_for(lambda: rollouts.get(first).state == "completed", 60), json.dumps(
            describe(app.db, first)["breach"]
        )
        assert sim.summary().versions == {1: N}
        tight = gates.model_copy(update={"latency_p95_ms": 0.00001})
        second = rollouts.start("rpi4:2", plan=WavePlan(canary="2"), gates=tight, on_breach="abort").id or 0
        assert wait_for(lambda: rollouts.get(second).state == "aborted", 60), rollouts.get(second)
        assert wait_for(lambda: describe(app.db, second)["totals"].get("rolled_back") == 2, 30), describe(
            app.db, second
        )
        assert describe(app.db, second)["unfinished_devices"] == 0
        assert sim.summary().versions == {1: N}  # the canary went to 2 and came back
    finally:
        stop.set()
        if simulating.is_alive():
            simulating.join(10)
        sim.stop()
        app.stop()
