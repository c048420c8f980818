"""Device profiles: the device's speed as reference-workload times, refused clearly when it is missing or old."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edgefleet.protocols.errors import ProfileError
from edgefleet.protocols.profile import ReferenceTimes, load_profile, parse_profile

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
BASE = """[profile]
name = "box"
storage_budget_bytes = 1000000
ram_budget_bytes = 100000000
latency_budget_ms = 5.0
threads = 2
int8_dot_product = false
"""
TIMES = "[profile.reference_ms]\nfp32_conv = 0.6\nfp32_matmul = 0.3\nint8_conv = 0.7\nint8_matmul = 0.36\n"


def test_every_shipped_profile_has_the_devices_reference_times() -> None:
    for path in PROFILES.glob("*.toml"):
        profile = load_profile(path)
        assert all(ms > 0 for ms in profile.reference_ms.model_dump().values()), path.name
        assert profile.speed_correction == 1.0
        assert "ESTIMATED" in path.read_text(), f"{path.name} must say what its reference times stand for"


def test_an_old_host_relative_speed_factor_is_refused_with_what_to_do() -> None:
    with pytest.raises(ProfileError, match=r"speed_factor .*edgefleet-agent speed-factor"):
        parse_profile(tomllib.loads(BASE + "speed_factor = 5.0\n" + TIMES), source="old.toml")


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ("", "reference_ms"),
        (TIMES.replace("fp32_conv = 0.6", "fp32_conv = 0"), "fp32_conv"),
        (TIMES.replace("fp32_conv = 0.6", "fp32_conv = nan"), "fp32_conv"),
        (TIMES.replace("fp32_conv = 0.6", 'fp32_conv = "fast"'), "fp32_conv"),
        (TIMES + "int4_conv = 1.0\n", "int4_conv"),
    ],
)
def test_missing_or_broken_reference_times_name_the_field(table: str, field: str) -> None:
    with pytest.raises(ProfileError, match=field):
        parse_profile(tomllib.loads(BASE + table), source="box.toml")


def test_device_over_host_per_path() -> None:
    profile = parse_profile(tomllib.loads(BASE + TIMES))
    host = ReferenceTimes(fp32_conv=0.2, fp32_matmul=0.1, int8_conv=0.1, int8_matmul=0.04)
    assert profile.device_over_host(host, int8=False) == pytest.approx(3.0)
    assert profile.device_over_host(host, int8=True) == pytest.approx((7.0 * 9.0) ** 0.5)
    assert profile.predict_ms(0.5, host, int8=False) == pytest.approx(1.5)
