"""Constraint analysis and judging: confidence bounds, which constraints the fp32 model violates, which passes help."""

from __future__ import annotations

import numpy as np
import pytest
from plankit import HOST, Tiny, make_profile

from edgefleet.compression.measure import Measurement
from edgefleet.compression.plan_compat import effective_opset, incompatibilities, runtime_limits
from edgefleet.compression.plan_constraints import (
    analyse,
    check_accuracy,
    check_resources,
    paired_drop_upper,
    wilson_lower,
    z_score,
)
from edgefleet.compression.plan_models import Constraint, ConstraintCheck
from edgefleet.compression.plan_search import chain_templates
from edgefleet.compression.recipe import PassKind
from edgefleet.protocols.profile import DeviceProfile

Z95 = z_score(0.95)


def fp32_measurement(*, file_bytes: int = 400_000, p95: float = 0.5, rss: int = 70_000_000) -> Measurement:
    return Measurement(
        file_bytes=file_bytes,
        transfer_bytes=file_bytes,
        parameters=file_bytes // 4,
        nonzero_parameters=file_bytes // 4,
        accuracy=0.99,
        latency_p50_ms=p95 / 2,
        latency_p95_ms=p95,
        threads=1,
        peak_rss_bytes=rss,
    )


def test_wilson_lower_bound_is_conservative_and_tightens_with_more_samples() -> None:
    assert wilson_lower(50, 50, Z95) < 0.96
    assert wilson_lower(5000, 5000, Z95) > 0.999
    assert wilson_lower(45, 50, 0.0) == pytest.approx(0.9)


def test_paired_drop_bound_counts_disagreements_not_accuracies() -> None:
    reference = np.ones(360, dtype=bool)
    same = reference.copy()
    observed, upper = paired_drop_upper(reference, same, Z95)
    assert observed == 0.0
    assert 0 < upper < 0.01  # no disagreement on 360 samples: certified within a point
    three_lost = reference.copy()
    three_lost[:3] = False
    observed, upper = paired_drop_upper(reference, three_lost, Z95)
    assert observed == pytest.approx(3 / 360)
    assert upper > 0.01  # three lost samples of 360 cannot certify a drop below 1 point


def test_accuracy_check_uses_the_bound_and_the_reference_always_fits() -> None:
    profile = make_profile(max_accuracy_drop=0.01)
    reference = np.ones(360, dtype=bool)
    assert check_accuracy(reference, reference, profile, z=Z95, is_reference=True).fits
    worse = reference.copy()
    worse[:3] = False
    check = check_accuracy(worse, reference, profile, z=Z95)
    assert not check.fits
    assert check.miss > 0
    assert check_accuracy(worse, reference, profile, z=0.0).fits  # the point estimate alone would accept it


def test_absolute_floor_uses_the_wilson_lower_bound() -> None:
    profile = make_profile(accuracy_floor=0.9, max_accuracy_drop=None)
    correct = np.zeros(50, dtype=bool)
    correct[:46] = True  # 92% of 50: not certainly above 90%
    assert not check_accuracy(correct, correct, profile, z=Z95).fits
    assert check_accuracy(correct, correct, profile, z=0.0).fits


def test_analysis_names_violated_constraints_needs_and_remedies() -> None:
    profile = make_profile(storage_budget_bytes=100_000, latency_budget_ms=1.0, int8_dot_product=False)
    m = fp32_measurement()
    checks = check_resources(m, 0.5 * 4.0, profile, HOST, int8=False)
    analysis = analyse(checks, m, profile, export_opset=17, n_val=360, z=Z95)
    assert set(analysis.violated) == {Constraint.STORAGE, Constraint.LATENCY}
    assert analysis.needs[Constraint.STORAGE] == pytest.approx(4.0)
    assert analysis.needs[Constraint.LATENCY] == pytest.approx(2.0)
    assert PassKind.QUANTIZE_STATIC in analysis.remedies[Constraint.STORAGE]
    assert PassKind.QUANTIZE_STATIC not in analysis.remedies[Constraint.LATENCY]  # no int8 dot-product
    assert PassKind.PRUNE_STRUCTURED in analysis.remedies[Constraint.LATENCY]
    assert any("no int8 dot-product" in note for note in analysis.notes)


def _checks(m: Measurement, profile: DeviceProfile) -> list[ConstraintCheck]:
    return check_resources(m, 1.0, profile, HOST, int8=False)


def test_int8_addresses_latency_only_with_dot_product() -> None:
    profile = make_profile(latency_budget_ms=0.1, int8_dot_product=True)
    m = fp32_measurement()
    analysis = analyse(
        check_resources(m, 1.0, profile, HOST, int8=False), m, profile, export_opset=17, n_val=360, z=Z95
    )
    assert PassKind.QUANTIZE_STATIC in analysis.remedies[Constraint.LATENCY]


def test_ram_the_runtime_alone_exceeds_is_reported_as_unreachable() -> None:
    profile = make_profile(ram_budget_bytes=10_000_000)
    m = fp32_measurement()
    analysis = analyse(
        check_resources(m, 1.0, profile, HOST, int8=False), m, profile, export_opset=17, n_val=360, z=Z95
    )
    assert Constraint.RAM in analysis.violated
    assert any("runtime alone" in note for note in analysis.notes)


def test_a_small_held_out_set_that_cannot_certify_the_drop_is_said() -> None:
    profile = make_profile(max_accuracy_drop=0.005)
    m = fp32_measurement()
    analysis = analyse(_checks(m, profile), m, profile, export_opset=17, n_val=60, z=Z95)
    assert any("cannot certify" in note for note in analysis.notes)


def test_runtime_limits_follow_onnxruntime_releases() -> None:
    assert runtime_limits(make_profile(onnxruntime_version="1.16")) == (19, 9)
    assert runtime_limits(make_profile(onnxruntime_version="1.10.0")) == (15, 8)
    assert runtime_limits(make_profile(onnxruntime_version="1.40")) == (21, 10)
    assert effective_opset(make_profile(onnxruntime_version="1.10", opset=17)) == 15


def test_an_artifact_above_the_profile_opset_is_incompatible(tiny: Tiny) -> None:
    onnx_bytes = tiny.onnx
    assert incompatibilities(onnx_bytes, make_profile(opset=17)) == []
    problems = incompatibilities(onnx_bytes, make_profile(opset=13))
    assert problems
    assert "opset 17" in problems[0]


def test_structural_chains_are_sized_to_the_needed_reduction() -> None:
    assert chain_templates(1.0, limit=8) == []
    templates = chain_templates(4.0, limit=8)
    widths = sorted({s for t in templates for k, s in t if k == PassKind.DISTILL and len(t) == 1})
    assert widths == [0.4, 0.47]  # parameters scale with width²: 1/sqrt(4 x 1.6) and 1/sqrt(4 x 1.15)
    prunes = sorted({s for t in templates for k, s in t if k == PassKind.PRUNE_STRUCTURED and len(t) == 1})
    assert prunes == [0.53, 0.6]
    assert any(len(t) == 2 and t[-1][0] == PassKind.FACTORIZE for t in templates)
    assert any([k for k, _ in t] == [PassKind.DISTILL, PassKind.PRUNE_STRUCTURED] for t in templates)  # large need
    assert len(chain_templates(4.0, limit=3)) == 3
