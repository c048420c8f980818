"""Measuring how much slower this device runs a model than the compressing host: the profile's speed factor.

Run on the device: `edgefleet-agent speed-factor model.onnx --host-p95-ms 0.8 --threads 4`; the p95 latency here
divided by the host's p95 for the same model is the `speed_factor` to write into the device class profile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.agent.errors import InferenceError
from edgefleet.agent.runner import ModelRunner

__all__ = ["SpeedMeasurement", "measure_latency", "random_input"]

_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}  # fmt: skip


@dataclass(frozen=True, slots=True)
class SpeedMeasurement:
    runs: int
    p50_ms: float
    p95_ms: float

    def factor(self, host_p95_ms: float) -> float:
        return self.p95_ms / host_p95_ms


def random_input(runner: ModelRunner, *, batch: int = 1) -> dict[str, np.ndarray]:
    """One random batch for every input, symbolic dimensions set to `batch`."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in runner.session_inputs():
        dtype = _DTYPES.get(spec.type)
        if dtype is None:
            raise InferenceError(f"input {spec.name} has type {spec.type}; speed-factor supports numeric tensors")
        shape = [d if isinstance(d, int) and d > 0 else batch for d in spec.shape]
        feeds[spec.name] = rng.normal(size=shape).astype(dtype)
    return feeds


def measure_latency(model: Path, *, threads: int, runs: int = 200, warmup: int = 20) -> SpeedMeasurement:
    runner = ModelRunner(model, threads=threads)
    feeds = random_input(runner)
    for _ in range(warmup):
        runner.run_feeds(feeds)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.run_feeds(feeds)
        samples.append((time.perf_counter() - start) * 1000.0)
    arr = np.asarray(samples)
    return SpeedMeasurement(runs, float(np.percentile(arr, 50)), float(np.percentile(arr, 95)))
