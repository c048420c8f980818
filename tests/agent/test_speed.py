"""The host-independent speed model: the shipped reference workload, its timing, and what a simulated device does
with it (the same device speed whatever host simulates it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from agentkit import PROFILE, tiny_model

from edgefleet.agent.runner import ModelRunner, load_session
from edgefleet.agent.speed import SimulatedSpeed, is_int8_model, time_workload, workload_dir
from edgefleet.protocols.profile import ReferenceTimes


def test_the_shipped_workload_is_what_its_index_says() -> None:
    index = json.loads((workload_dir() / "workload.json").read_text())
    assert list(index["models"]) == list(ReferenceTimes.model_fields)
    for name, entry in index["models"].items():
        data = (workload_dir() / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        session = load_session(workload_dir() / entry["file"], threads=1)
        (out,) = session.run(None, {"x": np.ones(entry["input"], dtype=np.float32)})
        assert np.isfinite(out).all()
        assert is_int8_model(workload_dir() / entry["file"]) is name.startswith("int8")


def test_timing_gives_positive_times_for_every_model() -> None:
    times = time_workload(threads=1, rounds=2, runs=5, warmup=1)
    assert all(ms > 0 for ms in times.model_dump().values())


def test_a_simulated_device_scales_by_device_over_host_on_the_models_path(tmp_path: Path) -> None:
    """Two hosts, one twice as slow on fp32 and four times on int8: the same class runs its models at the same
    device speed on both (the host's slowness divides out)."""
    profile = PROFILE.model_copy(
        update={"reference_ms": ReferenceTimes(fp32_conv=2.0, fp32_matmul=1.0, int8_conv=2.0, int8_matmul=1.0)}
    )
    fast = ReferenceTimes(fp32_conv=0.2, fp32_matmul=0.1, int8_conv=0.1, int8_matmul=0.05)
    slow = ReferenceTimes(fp32_conv=0.4, fp32_matmul=0.2, int8_conv=0.4, int8_matmul=0.2)
    on_fast, on_slow = SimulatedSpeed(profile, fast), SimulatedSpeed(profile, slow)
    assert on_fast.fp32 == pytest.approx(10.0)
    assert on_fast.int8 == pytest.approx(20.0)
    assert on_slow.fp32 * 2 == pytest.approx(on_fast.fp32)
    assert on_slow.int8 * 4 == pytest.approx(on_fast.int8)
    fp32_model = tmp_path / "m.onnx"
    fp32_model.write_bytes(tiny_model(1))
    assert on_fast.scale_for(fp32_model) == on_fast.fp32
    int8_model = workload_dir() / "int8_matmul.onnx"
    assert on_fast.scale_for(int8_model) == on_fast.int8
    runner = ModelRunner(fp32_model, threads=1, latency_scale=on_fast.scale_for(fp32_model))
    _, latency = runner.run_raw(np.ones((1, 4), dtype=np.float32))
    assert latency > 0
