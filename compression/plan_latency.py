"""The latency model: host latency times the device class's speed factor, and its update from fleet telemetry.

The speed factor of a profile is (p95 latency of a model on the device, at the profile's thread count) divided by
(p95 latency of the same model on the compressing host at `PlanOptions.host_threads`, 1 by default). The host is
measured single-threaded on purpose: a shared build machine's multi-threaded p95 measures its neighbours more
than the model, and the device's own thread scaling is already inside its measured factor.

    profile = update_speed_factor(profile, [LatencyObservation(device_p95_ms=4.1, host_p95_ms=0.7), ...])

This module needs only the standard library and `edgefleet.protocols`, so it can move next to the telemetry code
without bringing torch along.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.protocols.profile import DeviceProfile

__all__ = ["LatencyObservation", "predict_latency_ms", "update_speed_factor"]

MAX_SPEED_FACTOR = 1000.0


@dataclass(frozen=True, slots=True)
class LatencyObservation:
    """One artifact's p95 on devices of the class (from telemetry) and on the host that compressed it."""

    device_p95_ms: float
    host_p95_ms: float

    @property
    def ratio(self) -> float | None:
        """device / host, or None when either number is unusable (zero, negative, NaN, infinite)."""
        if not (math.isfinite(self.device_p95_ms) and math.isfinite(self.host_p95_ms)):
            return None
        if self.device_p95_ms <= 0 or self.host_p95_ms <= 0:
            return None
        return self.device_p95_ms / self.host_p95_ms


def predict_latency_ms(
    host_p95_ms: float,
    profile: DeviceProfile,
    *,
    int8: bool = False,
    float_parent_p95_ms: float | None = None,
    int8_penalty: float = 1.2,
) -> float:
    """Predicted p95 on the device: host p95 x speed factor.

    An int8 model on a CPU without int8 dot-product instructions is predicted from the float model it was quantized
    from (`float_parent_p95_ms`), times `int8_penalty`: there onnxruntime widens int8 to 16-bit multiply-accumulates
    and int8 is often slower than float, whatever the host (which may have VNNI) measured.
    """
    if int8 and not profile.int8_dot_product and float_parent_p95_ms is not None:
        return max(host_p95_ms, float_parent_p95_ms * int8_penalty) * profile.speed_factor
    return host_p95_ms * profile.speed_factor


def update_speed_factor(
    profile: DeviceProfile,
    observations: Iterable[LatencyObservation],
    *,
    min_observations: int = 3,
    max_step: float = 2.0,
) -> DeviceProfile:
    """The profile with its speed factor moved to the median device/host ratio of `observations`.

    Robust by construction: unusable observations are dropped, nothing changes with fewer than `min_observations`
    usable ones, the median ignores a few wild devices, and one update moves the factor by at most `max_step` times
    either way (several updates converge; one bad batch cannot swing the planner).
    """
    if max_step < 1.0:
        raise ValueError(f"max_step must be >= 1 (got {max_step})")
    ratios = [r for r in (o.ratio for o in observations) if r is not None]
    if len(ratios) < max(1, min_observations):
        return profile
    target = statistics.median(ratios)
    old = profile.speed_factor
    bounded = min(max(target, old / max_step), old * max_step, MAX_SPEED_FACTOR)
    return DeviceProfile.model_validate({**profile.model_dump(), "speed_factor": bounded})
