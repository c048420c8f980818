"""Measurement, one function used everywhere: size, transfer size, parameters, accuracy, latency, peak RSS.

`measure(onnx_bytes, task)` returns a `Measurement`; pass `baseline=` (the fp32 export's measurement) to fill in the
ratios. Latency is onnxruntime at batch 1 on `threads` intra-op threads, after warm-up, over many runs; at one thread
(the planner's host measurement) each run is timed in the calling thread's CPU time, where onnxruntime computes it, so
a busy host's scheduler does not stretch it: the same clock as the host's reference-workload times and the simulated
devices' (agent/speed.py, agent/runner.py), which a device latency is predicted from. Peak RSS is
taken from a fresh Python process that imports onnxruntime (never torch), loads the model and runs it: what a device
process would hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx
import zstandard
from pydantic import BaseModel, ConfigDict, Field

from edgefleet.compression.errors import CompressionError
from edgefleet.compression.export import onnx_parameter_counts, run_onnx, session
from edgefleet.compression.task import Task

__all__ = ["Measurement", "measure", "peak_rss_bytes", "transfer_bytes", "with_ratios"]

ZSTD_LEVEL = 19

# Runs in a fresh interpreter: imports onnxruntime and numpy only, so the number is what a device process holds.
_RSS_CHILD = """
import json, resource, sys
import numpy as np
import onnxruntime as ort
path, threads, runs, shape = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random([1, *shape], dtype=np.float32)
name = sess.get_inputs()[0].name
for _ in range(runs):
    sess.run(None, {name: x})
# VmHWM is this address space's high-water mark; ru_maxrss would carry the parent's over fork+exec.
with open("/proc/self/status") as status:
    hwm = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")]
peak = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss_bytes": peak, "torch_loaded": "torch" in sys.modules}))
"""


class Measurement(BaseModel):
    """What one ONNX model costs and how well it does; ratios are against `baseline` (the fp32 export) if given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_bytes: int
    transfer_bytes: Annotated[int, Field(description=f"zstd level {ZSTD_LEVEL} compressed size")]
    parameters: int
    nonzero_parameters: int
    accuracy: float
    latency_p50_ms: float
    latency_p95_ms: float
    threads: int
    peak_rss_bytes: int | None = None
    size_ratio: Annotated[float | None, Field(description="baseline bytes / these bytes (>1 is smaller)")] = None
    transfer_ratio: float | None = None
    latency_p50_ratio: Annotated[float | None, Field(description="these p50 ms / baseline p50 ms (<1 faster)")] = None
    latency_p95_ratio: float | None = None
    accuracy_delta: Annotated[float | None, Field(description="accuracy minus the baseline's")] = None
    rss_ratio: float | None = None


def transfer_bytes(data: bytes, *, level: int = ZSTD_LEVEL) -> int:
    """Bytes on the wire after zstd compression (what an artifact download costs)."""
    return len(zstandard.ZstdCompressor(level=level).compress(data))


def _latency_ms(data: bytes, sample: np.ndarray, *, threads: int, runs: int, warmup: int) -> tuple[float, float]:
    sess = session(data, threads=threads)
    name = sess.get_inputs()[0].name
    feeds = [{name: sample[i % len(sample)][None]} for i in range(min(len(sample), 32))]
    for i in range(warmup):
        sess.run(None, feeds[i % len(feeds)])
    clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
    times = np.empty(runs)
    for i in range(runs):
        begin = clock()
        sess.run(None, feeds[i % len(feeds)])
        times[i] = (clock() - begin) / 1e6
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def peak_rss_bytes(data: bytes, input_shape: tuple[int, ...], *, threads: int = 1, runs: int = 50) -> int:
    """Peak resident memory of a fresh process (onnxruntime, no torch) that loads the model and runs it."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-rss-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(data)
        args = [sys.executable, "-c", _RSS_CHILD, str(path), str(threads), str(runs), json.dumps(list(input_shape))]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True, env=env)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            stderr = getattr(exc, "stderr", "") or ""
            raise CompressionError(f"the RSS probe process failed: {stderr.strip()[-500:] or exc}") from exc
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return int(result["peak_rss_bytes"])


def measure(
    data: bytes,
    task: Task,
    *,
    threads: int = 1,
    runs: int = 300,
    warmup: int = 30,
    rss: bool = True,
    baseline: Measurement | None = None,
) -> Measurement:
    """Measure an ONNX model on a task's held-out data; see the module docstring for what each field means."""
    parameters, nonzero = onnx_parameter_counts(onnx.load_from_string(data))
    predictions = run_onnx(data, task.x_val).argmax(axis=1)
    p50, p95 = _latency_ms(data, task.x_val, threads=threads, runs=runs, warmup=warmup)
    result = Measurement(
        file_bytes=len(data),
        transfer_bytes=transfer_bytes(data),
        parameters=parameters,
        nonzero_parameters=nonzero,
        accuracy=float(np.mean(predictions == task.y_val)),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        threads=threads,
        peak_rss_bytes=peak_rss_bytes(data, task.input_shape, threads=threads) if rss else None,
    )
    return with_ratios(result, baseline) if baseline is not None else result


def with_ratios(result: Measurement, baseline: Measurement) -> Measurement:
    """`result` with its ratios against `baseline` filled in."""
    rss_ratio = None
    if result.peak_rss_bytes and baseline.peak_rss_bytes:
        rss_ratio = result.peak_rss_bytes / baseline.peak_rss_bytes
    return result.model_copy(
        update={
            "size_ratio": baseline.file_bytes / result.file_bytes,
            "transfer_ratio": baseline.transfer_bytes / result.transfer_bytes,
            "latency_p50_ratio": result.latency_p50_ms / baseline.latency_p50_ms,
            "latency_p95_ratio": result.latency_p95_ms / baseline.latency_p95_ms,
            "accuracy_delta": result.accuracy - baseline.accuracy,
            "rss_ratio": rss_ratio,
        }
    )
