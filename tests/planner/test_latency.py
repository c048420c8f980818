"""The latency model: device/host on the reference workload per path, and the field's correction of it."""

from __future__ import annotations

import math

import pytest
from plankit import make_profile

from edgefleet.compression.plan_latency import LatencyObservation, predict_latency_ms, update_speed_correction
from edgefleet.protocols.profile import ReferenceTimes

HOST = ReferenceTimes(fp32_conv=0.2, fp32_matmul=0.1, int8_conv=0.1, int8_matmul=0.04)


def _device(fp32: float, int8: float) -> dict[str, float]:
    """Reference times of a device `fp32` / `int8` times slower than HOST on each path."""
    return {"fp32_conv": 0.2 * fp32, "fp32_matmul": 0.1 * fp32, "int8_conv": 0.1 * int8, "int8_matmul": 0.04 * int8}


def test_prediction_is_host_latency_times_device_over_host_on_the_path() -> None:
    profile = make_profile(reference_ms=_device(6.0, 15.0))
    assert predict_latency_ms(0.5, profile, HOST, int8=False) == pytest.approx(3.0)
    assert predict_latency_ms(0.5, profile, HOST, int8=True) == pytest.approx(7.5)


def test_the_prediction_does_not_depend_on_the_host() -> None:
    """A host 3x slower on fp32 and 5x slower on int8 (no VNNI) times a model slower by the same amounts: the
    predicted device latency stays where it was."""
    profile = make_profile(reference_ms=_device(6.0, 15.0))
    slow_host = ReferenceTimes(fp32_conv=0.6, fp32_matmul=0.3, int8_conv=0.5, int8_matmul=0.2)
    for int8, slowdown in ((False, 3.0), (True, 5.0)):
        here = predict_latency_ms(0.5, profile, HOST, int8=int8)
        there = predict_latency_ms(0.5 * slowdown, profile, slow_host, int8=int8)
        assert there == pytest.approx(here)


def test_device_over_host_is_the_geometric_mean_of_the_paths_two_models() -> None:
    profile = make_profile(reference_ms={"fp32_conv": 0.8, "fp32_matmul": 0.1, "int8_conv": 1.0, "int8_matmul": 1.0})
    assert profile.device_over_host(HOST, int8=False) == pytest.approx(math.sqrt(4.0 * 1.0))


def test_correction_moves_to_the_median_field_over_predicted_ratio() -> None:
    profile = make_profile()
    observations = [LatencyObservation(device_p95_ms=d, predicted_p95_ms=2.0) for d in (2.2, 2.4, 2.6, 90.0)]
    updated = update_speed_correction(profile, observations)
    assert updated.speed_correction == pytest.approx(1.25)  # the 45x outlier does not drag it
    assert profile.speed_correction == 1.0  # the input profile is not changed
    assert predict_latency_ms(1.0, updated, HOST, int8=False) == pytest.approx(
        1.25 * predict_latency_ms(1.0, profile, HOST, int8=False)
    )


def test_one_update_moves_the_correction_at_most_max_step() -> None:
    profile = make_profile()
    observations = [LatencyObservation(device_p95_ms=50.0, predicted_p95_ms=1.0)] * 5
    assert update_speed_correction(profile, observations, max_step=2.0).speed_correction == pytest.approx(2.0)
    down = [LatencyObservation(device_p95_ms=0.01, predicted_p95_ms=1.0)] * 5
    assert update_speed_correction(profile, down, max_step=2.0).speed_correction == pytest.approx(0.5)


def test_unusable_observations_change_nothing() -> None:
    profile = make_profile()
    bad = [
        LatencyObservation(device_p95_ms=math.nan, predicted_p95_ms=1.0),
        LatencyObservation(device_p95_ms=4.0, predicted_p95_ms=0.0),
        LatencyObservation(device_p95_ms=-1.0, predicted_p95_ms=1.0),
        LatencyObservation(device_p95_ms=4.0, predicted_p95_ms=1.0),
    ]
    assert update_speed_correction(profile, bad).speed_correction == 1.0
    assert update_speed_correction(profile, []).speed_correction == 1.0
    with pytest.raises(ValueError, match="max_step"):
        update_speed_correction(profile, bad, max_step=0.5)
