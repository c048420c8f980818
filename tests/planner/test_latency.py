"""The latency model: prediction from host latency, and the speed factor learned from fleet telemetry."""

from __future__ import annotations

import math

import pytest
from plankit import make_profile

from edgefleet.compression.plan_latency import LatencyObservation, predict_latency_ms, update_speed_factor


def test_prediction_is_host_latency_times_speed_factor() -> None:
    assert predict_latency_ms(0.5, make_profile(speed_factor=6.0)) == pytest.approx(3.0)


def test_int8_without_dot_product_is_predicted_from_its_float_parent() -> None:
    no_dot = make_profile(speed_factor=10.0, int8_dot_product=False)
    with_dot = make_profile(speed_factor=10.0, int8_dot_product=True)
    # the host (with VNNI) ran the int8 model in 0.2 ms, its float parent in 0.5 ms
    assert predict_latency_ms(0.2, with_dot, int8=True, float_parent_p95_ms=0.5) == pytest.approx(2.0)
    assert predict_latency_ms(0.2, no_dot, int8=True, float_parent_p95_ms=0.5, int8_penalty=1.2) == pytest.approx(6.0)


def test_speed_factor_moves_to_the_median_ratio() -> None:
    profile = make_profile(speed_factor=5.0)
    observations = [LatencyObservation(device_p95_ms=d, host_p95_ms=1.0) for d in (5.5, 6.0, 6.2, 90.0)]
    updated = update_speed_factor(profile, observations)
    assert updated.speed_factor == pytest.approx(6.1)  # the 90x outlier does not drag it
    assert updated.name == profile.name
    assert profile.speed_factor == 5.0  # the input profile is not changed


def test_one_update_moves_the_factor_at_most_max_step_times() -> None:
    profile = make_profile(speed_factor=2.0)
    observations = [LatencyObservation(device_p95_ms=50.0, host_p95_ms=1.0)] * 5
    assert update_speed_factor(profile, observations, max_step=2.0).speed_factor == pytest.approx(4.0)
    down = [LatencyObservation(device_p95_ms=0.01, host_p95_ms=1.0)] * 5
    assert update_speed_factor(profile, down, max_step=2.0).speed_factor == pytest.approx(1.0)


def test_too_few_or_unusable_observations_change_nothing() -> None:
    profile = make_profile(speed_factor=3.0)
    bad = [
        LatencyObservation(device_p95_ms=math.nan, host_p95_ms=1.0),
        LatencyObservation(device_p95_ms=4.0, host_p95_ms=0.0),
        LatencyObservation(device_p95_ms=-1.0, host_p95_ms=1.0),
        LatencyObservation(device_p95_ms=4.0, host_p95_ms=1.0),
    ]
    assert update_speed_factor(profile, bad).speed_factor == 3.0
    assert update_speed_factor(profile, []).speed_factor == 3.0
    with pytest.raises(ValueError, match="max_step"):
        update_speed_factor(profile, bad, max_step=0.5)
