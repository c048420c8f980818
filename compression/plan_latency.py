"""The latency model: host latency x device/host on the reference workload, and its correction from fleet telemetry.

A profile records the device's times on the fixed reference workload (`[profile.reference_ms]`, agent/workload/);
the planner times the same workload on its own host (compression/host_speed.py) and predicts a candidate's device
p95 as its host p95 x device/host for the candidate's path, fp32 or int8 (`DeviceProfile.predict_ms`). An int8
model on a CPU without int8 dot-product instructions is slow there because the device's int8 reference times say
so, not because of an assumed penalty. The host is timed at one thread (`PlanOptions.host_threads`): a shared build
machine's multi-threaded p95 measures its neighbours more than the model, and the device's own thread scaling is
inside its reference times, taken at the profile's `threads`.

The field is the ground truth that corrects the model: `update_speed_correction` moves the profile's
`speed_correction` to the median field/predicted ratio of a class's artifacts.

    profile = update_speed_correction(profile, [LatencyObservation(device_p95_ms=4.1, predicted_p95_ms=3.0), ...])

This module needs only the standard library and `edgefleet.protocols`, so it can move next to the telemetry code
without bringing torch along.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes

__all__ = ["LatencyObservation", "predict_latency_ms", "update_speed_correction"]

MAX_CORRECTION = 1000.0


@dataclass(frozen=True, slots=True)
class LatencyObservation:
    """One artifact's p95 on devices of the class (from telemetry) and the p95 the planner predicted for it."""

    device_p95_ms: float
    predicted_p95_ms: float

    @property
    def ratio(self) -> float | None:
        """field / predicted, or None when either number is unusable (zero, negative, NaN, infinite)."""
        if not (math.isfinite(self.device_p95_ms) and math.isfinite(self.predicted_p95_ms)):
            return None
        if self.device_p95_ms <= 0 or self.predicted_p95_ms <= 0:
            return None
        return self.device_p95_ms / self.predicted_p95_ms


def predict_latency_ms(host_p95_ms: float, profile: DeviceProfile, host: ReferenceTimes, *, int8: bool) -> float:
    """Predicted p95 on the device: host p95 x device/host on the model's path x the field's correction."""
    return profile.predict_ms(host_p95_ms, host, int8=int8)


def update_speed_correction(
    profile: DeviceProfile,
    observations: Iterable[LatencyObservation],
    *,
    min_observations: int = 3,
    max_step: float = 2.0,
) -> DeviceProfile:
    """The profile with its `speed_correction` multiplied by the median field/predicted ratio of `observations`.

    Robust by construction: unusable observations are dropped, nothing changes with fewer than `min_observations`
    usable ones, the median ignores a few wild devices, and one update moves the correction by at most `max_step`
    times either way (several updates converge; one bad batch cannot swing the planner).
    """
    if max_step < 1.0:
        raise ValueError(f"max_step must be >= 1 (got {max_step})")
    ratios = [r for r in (o.ratio for o in observations) if r is not None]
    if len(ratios) < max(1, min_observations):
        return profile
    step = min(max(statistics.median(ratios), 1 / max_step), max_step)
    corrected = min(profile.speed_correction * step, MAX_CORRECTION)
    return profile.model_copy(update={"speed_correction": corrected})
