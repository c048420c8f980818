"""Running a model with onnxruntime: one session per model at the class's thread count, timed per call.

Simulated devices share sessions through a `SessionPool` (one per model digest and thread count) and scale the
measured latency by device / host on the reference workload (agent/speed.py), so one host can stand in for a slower
device class.

What a scaled latency times: a simulated device (`latency_scale != 1.0`: device / host for the model's path times a
fault's `slow_factor`; a real device always runs at 1.0) stands for the device's compute, which is not what the host's
wall clock shows:
- it infers a few times a second, so the host thread has slept between two inferences and its first run pays the
  host's wake-up (an idle CPU leaving its sleep state, caches cold: 0.2-0.3 ms on a VM, several times a small model's
  compute). So a scaled run infers once (the outputs) and times the runs right after it, warm;
- on a shared host the scheduler preempts a run for other processes (a busy core, the controller, the broker): the
  wall time of that run measures the neighbours. So the warm runs are timed in this thread's CPU time
  (`time.thread_time`; the session runs on the calling thread at one intra-op thread), and the lower of two counts.
The reported latency is that warm compute time x the scale. Unscaled (real device) timing is one timed run in wall
time, wake-up included, since there it is what the device does.

Example::

    runner = ModelRunner(path, threads=4)
    result = runner.run(x)            # result.outputs, result.latency_s, result.predicted, result.confidence
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgefleet.agent.errors import InferenceError

__all__ = ["InferenceResult", "ModelRunner", "SessionPool", "load_session", "runtime_version"]

log = logging.getLogger(__name__)


def runtime_version() -> str:
    """The installed onnxruntime as `major.minor.patch` (a dev or local suffix dropped), e.g. "1.32.0".

    What the device reports in its birth and what the manifest's `min_onnxruntime_version` is checked against: the
    runtime that will load the model, not what the class profile says its devices run.
    """
    numbers = []
    for part in str(ort.__version__).replace("+", "-").split("-", 1)[0].split(".")[:3]:
        if not part.isdigit():
            break
        numbers.append(part)
    return ".".join(numbers + ["0"] * (2 - len(numbers)))  # the wire's VersionString wants at least major.minor


def load_session(path: Path, *, threads: int) -> Any:
    """An onnxruntime CPU session limited to `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise InferenceError(f"onnxruntime cannot load {path}: {exc}") from exc


class SessionPool:
    """Sessions shared between simulated devices, keyed by model digest and thread count."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, path: Path, *, threads: int) -> Any:
        key = (digest, threads)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = load_session(path, threads=threads)
                self._sessions[key] = session
            return session

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    outputs: np.ndarray
    latency_s: float
    predicted: np.ndarray
    confidence: np.ndarray


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, unless the outputs already are probabilities."""
    x = logits.astype(np.float64, copy=False)
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if np.all(x >= 0) and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3):
        return x
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    probs: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs


class ModelRunner:
    """One loaded model. `latency_scale` multiplies measured latency (a simulated device's device / host, fixed or
    read at each run); a scaled
    latency is the warm compute time of a second, identical run (module docstring)."""

    def __init__(
        self,
        model_path: Path,
        *,
        threads: int,
        latency_scale: float | Callable[[], float] = 1.0,
        session: Any | None = None,
        clock: Callable[[], float] = time.perf_counter,
        compute_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.model_path = model_path
        self.latency_scale = latency_scale
        self._session = session if session is not None else load_session(model_path, threads=threads)
        self._clock = clock
        self._compute_clock = compute_clock
        inputs = self._session.get_inputs()
        self.input_names: tuple[str, ...] = tuple(i.name for i in inputs)
        self.output_names: tuple[str, ...] = tuple(o.name for o in self._session.get_outputs())
        self.input_name: str = inputs[0].name
        self.input_type: str = inputs[0].type

    def session_inputs(self) -> list[Any]:
        """onnxruntime's input descriptions (name, type, shape)."""
        return list(self._session.get_inputs())

    def _prepare(self, x: Any) -> np.ndarray:
        array = np.asarray(x)
        if self.input_type == "tensor(float)" and array.dtype != np.float32:
            array = array.astype(np.float32)
        return array

    def _timed_run(
        self, feeds: dict[str, np.ndarray], clock: Callable[[], float] | None = None
    ) -> tuple[list[Any], float]:
        clock = clock or self._clock
        start = clock()
        try:
            outputs = self._session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises untyped errors for shape/type mismatches
            shapes = {k: v.shape for k, v in feeds.items()}
            raise InferenceError(f"{self.model_path.name}: inference failed on inputs {shapes}: {exc}") from exc
        return outputs, clock() - start

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """All outputs by name for named inputs, and the latency in seconds: measured as is at scale 1.0, else the
        lower warm compute time of two more identical runs, times the scale (see the module docstring)."""
        outputs, elapsed = self._timed_run(feeds)
        scale = self.latency_scale() if callable(self.latency_scale) else self.latency_scale
        if callable(self.latency_scale) or scale != 1.0:
            compute = min(self._timed_run(feeds, self._compute_clock)[1] for _ in range(2))
            elapsed = compute * scale
        return {name: np.asarray(out) for name, out in zip(self.output_names, outputs, strict=True)}, elapsed

    def run_raw(self, x: Any) -> tuple[np.ndarray, float]:
        """The first model output for a single-input model, and the (scaled) latency in seconds."""
        if len(self.input_names) != 1:
            raise InferenceError(
                f"{self.model_path.name} has {len(self.input_names)} inputs; use run_feeds with one array per name"
            )
        outputs, elapsed = self.run_feeds({self.input_name: self._prepare(x)})
        return outputs[self.output_names[0]], elapsed

    def run(self, x: Any) -> InferenceResult:
        """Run one batch; predicted class and confidence come from the first output's last axis."""
        outputs, latency = self.run_raw(x)
        probs = _probabilities(outputs)
        return InferenceResult(outputs, latency, probs.argmax(axis=-1), probs.max(axis=-1))
