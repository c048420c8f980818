"""How fast this CPU runs models: its times on edgefleet's fixed reference workload (agent/workload/).

A device class's profile records the device's times on the workload (`[profile.reference_ms]`, at the profile's
thread count); the planner and the fleet simulator time the same workload on their own host, with this same code,
and scale a model's host latency by device / host for the model's path (fp32 or int8). So a prediction, and a
simulated rpi4, do not depend on which machine plans or simulates: a slower host, or one whose int8 path lacks VNNI,
measures slower reference times too, and the ratio stays the device's.

On a device (paste the printed table into the class profile)::

    edgefleet-agent speed-factor --threads 4

On a host, in Python::

    times = time_workload(threads=1)          # ReferenceTimes(fp32_conv=0.21, ...), milliseconds
    speed = SimulatedSpeed(profile, times)  # what a simulated device of that class multiplies its timings by

Each time is the lowest of several rounds' medians, the rounds interleaved across the four models: a burst of
interference from another process spoils one round of each model, not the verdict. At one thread a run is timed in
this thread's CPU time (onnxruntime computes on the calling thread), as simulated devices time their models
(agent/runner.py): a busy host's scheduler stretches wall time, not the computation. At more threads, wall time.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.errors import InferenceError
from edgefleet.agent.runner import ModelRunner, load_session, runtime_version
from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes

__all__ = ["SimulatedSpeed", "WorkloadTimer", "is_int8_model", "random_input", "time_workload", "workload_dir"]

_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}  # fmt: skip
# Operator names only an integer-quantized graph holds (QDQ, QOperator and dynamic int8 alike).
_INT8_OPS = (b"QuantizeLinear", b"QLinear", b"MatMulInteger", b"ConvInteger", b"DynamicQuantizeLinear")
_MAX_SCAN_BYTES = 512 * 2**20


def workload_dir() -> Path:
    """The shipped reference models (package data of edgefleet.agent)."""
    return Path(__file__).with_name("workload")


def _index() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((workload_dir() / "workload.json").read_text())
    return data


class WorkloadTimer:
    """The four reference sessions loaded once, timed as often as asked (the simulator re-times every few seconds)."""

    def __init__(self, *, threads: int) -> None:
        models = _index()["models"]
        rng = np.random.default_rng(1)
        self.threads = threads
        self._clock = time.thread_time if threads == 1 else time.perf_counter
        self._prepared = []
        for name in ReferenceTimes.model_fields:
            entry = models[name]
            session = load_session(workload_dir() / entry["file"], threads=threads)
            feeds = {"x": rng.standard_normal(entry["input"]).astype(np.float32)}
            self._prepared.append((name, session, feeds))

    def time(self, *, rounds: int = 7, runs: int = 40, warmup: int = 10) -> ReferenceTimes:
        """Median milliseconds of one run of each model, the lowest of `rounds` interleaved rounds."""
        for _, session, feeds in self._prepared:
            for _ in range(warmup):
                session.run(None, feeds)
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, session, feeds in self._prepared:
                samples = []
                for _ in range(runs):
                    start = self._clock()
                    session.run(None, feeds)
                    samples.append(self._clock() - start)
                median_ms = statistics.median(samples) * 1000.0
                best[name] = min(best.get(name, median_ms), median_ms)
        return ReferenceTimes(**{name: max(round(ms, 4), 1e-4) for name, ms in best.items()})


def time_workload(*, threads: int, rounds: int = 7, runs: int = 40, warmup: int = 10) -> ReferenceTimes:
    """Median milliseconds of one run of each reference model at `threads` intra-op threads (lowest round)."""
    return WorkloadTimer(threads=threads).time(rounds=rounds, runs=runs, warmup=warmup)


def describe_host(threads: int) -> dict[str, Any]:
    """What a measurement was taken on: enough to tell two hosts (or a changed runtime) apart."""
    flags = ""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in {"model name", "Model", "CPU part"} and not model:
                model = value.strip()
            if key.strip() in {"flags", "Features"} and not flags:
                flags = value
    except OSError:
        pass
    marks = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp", "i8mm") if f in flags.split()]
    return {"cpu": model or "unknown", "isa": marks, "onnxruntime": runtime_version(), "threads": threads}


def is_int8_model(path: Path) -> bool:
    """Whether an ONNX file computes in int8: its graph names an integer-quantized operator.

    The agent does not parse ONNX (no onnx package on a device); operator types are plain strings in the file,
    so a byte search finds them. Only the simulator asks, to pick which of a class's speed paths a model runs on.
    """
    size = path.stat().st_size
    if size > _MAX_SCAN_BYTES:
        return False
    data = path.read_bytes()
    return any(op in data for op in _INT8_OPS)


class SimulatedSpeed:
    """What a simulated device of one class multiplies its host compute times by: device / host per path.

    The host side can be refreshed (`update`): the simulator re-times the reference workload every few seconds, so
    a host that gets busier (a neighbour on the other SMT thread, a controller training a model) is slower on the
    reference too and the simulated device keeps the speed its profile gives it.
    """

    __slots__ = ("_int8_files", "fp32", "host", "int8", "profile")

    def __init__(self, profile: DeviceProfile, host: ReferenceTimes) -> None:
        self.profile = profile
        # model file (path, size, mtime) -> int8?: a model switch on a thousand simulated devices reads it once
        self._int8_files: dict[tuple[str, int, int], bool] = {}
        self.update(host)

    def update(self, host: ReferenceTimes) -> None:
        self.host = host
        self.fp32 = self.profile.device_over_host(host, int8=False)
        self.int8 = self.profile.device_over_host(host, int8=True)

    def _is_int8(self, model: Path) -> bool:
        stat = model.stat()
        key = (str(model), stat.st_size, stat.st_mtime_ns)
        if key not in self._int8_files:
            self._int8_files[key] = is_int8_model(model)
        return self._int8_files[key]

    def scale_for(self, model: Path) -> float:
        """The factor for `model` now."""
        return self.int8 if self._is_int8(model) else self.fp32

    def scaler(self, model: Path, *, times: float = 1.0) -> Callable[[], float]:
        """The factor for `model` (x `times`, e.g. a fault's slow factor) as it is at each call."""
        int8 = self._is_int8(model)
        return lambda: (self.int8 if int8 else self.fp32) * times


def random_input(runner: ModelRunner, *, batch: int = 1) -> dict[str, np.ndarray]:
    """One random batch for every input, symbolic dimensions set to `batch`."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in runner.session_inputs():
        dtype = _DTYPES.get(spec.type)
        if dtype is None:
            raise InferenceError(f"input {spec.name} has type {spec.type}; only numeric tensors can be generated")
        shape = [d if isinstance(d, int) and d > 0 else batch for d in spec.shape]
        feeds[spec.name] = rng.normal(size=shape).astype(dtype)
    return feeds
