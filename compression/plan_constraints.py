"""Judging a measured model against a device profile, and the constraint analysis that starts a plan.

Accuracy is judged with a one-sided confidence bound, because held-out sets on the edge are small (360 digits, a
few hundred sensor windows) and the planner picks the best of many candidates on the same set:

- an absolute floor (`accuracy_floor`) needs the Wilson lower bound of the candidate's accuracy above the floor;
- a maximum drop versus fp32 (`max_accuracy_drop`) is a paired comparison on the same samples: with `b` samples
  the fp32 model gets right and the candidate wrong and `c` the other way round, the drop is (b - c) / n and its
  upper bound uses the variance of the per-sample differences, with Agresti and Min's 0.5 added to each discordant
  count so that a candidate with no disagreements on 50 samples is not declared certain. The fp32 model itself is
  the reference and never misses its own drop.
With n in the thousands the bounds close on the point estimates; `PlanOptions.confidence = 0.5` turns them off.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from edgefleet.compression.measure import Measurement
from edgefleet.compression.plan_models import Constraint, ConstraintAnalysis, ConstraintCheck
from edgefleet.compression.recipe import PassKind
from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes

__all__ = [
    "analyse",
    "check_accuracy",
    "check_resources",
    "paired_drop_upper",
    "remedies",
    "wilson_lower",
    "z_score",
]

Correct = npt.NDArray[np.bool_]


def z_score(confidence: float) -> float:
    """One-sided normal quantile: 1.645 for 0.95, 0 for 0.5."""
    return NormalDist().inv_cdf(confidence)


def wilson_lower(successes: int, n: int, z: float) -> float:
    """Wilson score lower bound of a binomial proportion."""
    if n <= 0:
        return 0.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / denominator)


def paired_drop_upper(reference: Correct, candidate: Correct, z: float) -> tuple[float, float]:
    """(observed drop, upper confidence bound of the drop) of `candidate` versus `reference` on the same samples."""
    n = len(reference)
    if n == 0:
        return 0.0, 1.0
    lost = float(np.sum(reference & ~candidate))
    gained = float(np.sum(~reference & candidate))
    observed = (lost - gained) / n
    b, c, m = lost + 0.5, gained + 0.5, n + 2
    mean = (b - c) / m
    variance = max(0.0, (b + c) / m - mean * mean) / m
    return observed, min(1.0, mean + z * math.sqrt(variance))


def check_accuracy(
    correct: Correct, reference: Correct, profile: DeviceProfile, *, z: float, is_reference: bool = False
) -> ConstraintCheck:
    """The accuracy check; `value` is the conservative accuracy that has to reach `budget` (the required one)."""
    n = len(correct)
    accuracy = float(np.mean(correct)) if n else 0.0
    fp32_accuracy = float(np.mean(reference)) if n else 0.0
    required = profile.required_accuracy(fp32_accuracy)
    slacks: list[float] = []
    details: list[str] = []
    if profile.accuracy_floor is not None:
        lower = wilson_lower(int(np.sum(correct)), n, z)
        slacks.append(lower - profile.accuracy_floor)
        details.append(f"lower bound {lower:.4f} vs floor {profile.accuracy_floor:.4f}")
    if profile.max_accuracy_drop is not None:
        observed, upper = (0.0, 0.0) if is_reference else paired_drop_upper(reference, correct, z)
        slacks.append(profile.max_accuracy_drop - upper)
        details.append(
            f"drop {observed * 100:+.2f} pt (bound {upper * 100:.2f}) vs max {profile.max_accuracy_drop * 100:.2f}"
        )
    slack = min(slacks) if slacks else 1.0
    return ConstraintCheck(
        constraint=Constraint.ACCURACY,
        value=required + slack,
        budget=required,
        unit="accuracy",
        fits=slack >= 0,
        slack=slack,
        detail=f"accuracy {accuracy:.4f} on {n} held-out samples; " + "; ".join(details),
    )


def _relative(constraint: Constraint, value: float, budget: float, unit: str, detail: str = "") -> ConstraintCheck:
    slack = (budget - value) / budget
    return ConstraintCheck(
        constraint=constraint, value=value, budget=budget, unit=unit, fits=value <= budget, slack=slack, detail=detail
    )


def check_resources(
    measurement: Measurement, predicted_ms: float, profile: DeviceProfile, host: ReferenceTimes, *, int8: bool
) -> list[ConstraintCheck]:
    """Storage (file bytes), RAM (peak RSS, when measured) and predicted device p95 latency."""
    ratio = profile.device_over_host(host, int8=int8)
    correction = f" x field correction {profile.speed_correction:.3g}" if profile.speed_correction != 1.0 else ""
    checks = [_relative(Constraint.STORAGE, measurement.file_bytes, profile.storage_budget_bytes, "bytes")]
    if measurement.peak_rss_bytes is not None:
        checks.append(_relative(Constraint.RAM, measurement.peak_rss_bytes, profile.ram_budget_bytes, "bytes"))
    checks.append(
        _relative(
            Constraint.LATENCY,
            predicted_ms,
            profile.latency_budget_ms,
            "ms",
            detail=f"host p95 {measurement.latency_p95_ms:.3f} ms x device/host {ratio:.3g} on the "
            f"{'int8' if int8 else 'fp32'} reference workload{correction}",
        )
    )
    return checks


def remedies(profile: DeviceProfile) -> dict[Constraint, list[PassKind]]:
    """Which passes address which constraint on this profile (int8 helps latency only with int8 dot-product)."""
    latency = [PassKind.PRUNE_STRUCTURED, PassKind.FACTORIZE, PassKind.DISTILL]
    if profile.int8_dot_product:
        latency.append(PassKind.QUANTIZE_STATIC)
    return {
        Constraint.STORAGE: [
            PassKind.QUANTIZE_STATIC,
            PassKind.FP16,
            PassKind.FACTORIZE,
            PassKind.PRUNE_STRUCTURED,
            PassKind.DISTILL,
        ],
        Constraint.RAM: [PassKind.PRUNE_STRUCTURED, PassKind.DISTILL],
        Constraint.LATENCY: latency,
        Constraint.ACCURACY: [PassKind.DISTILL],
    }


def _needs(checks: list[ConstraintCheck], measurement: Measurement) -> dict[Constraint, float]:
    needs: dict[Constraint, float] = {}
    for check in checks:
        if check.fits or check.constraint == Constraint.ACCURACY:
            continue
        if check.constraint == Constraint.RAM:
            # RSS is the runtime plus roughly the model; only the model part can shrink.
            excess = check.value - check.budget
            model_part = float(measurement.file_bytes)
            needs[Constraint.RAM] = model_part / (model_part - excess) if excess < model_part else math.inf
        else:
            needs[check.constraint] = check.value / check.budget
    return needs


def analyse(
    checks: list[ConstraintCheck],
    measurement: Measurement,
    profile: DeviceProfile,
    *,
    export_opset: int,
    n_val: int,
    z: float,
) -> ConstraintAnalysis:
    """Which constraints the fp32 model violates, how much reduction each needs, which passes to start from."""
    violated = [c.constraint for c in checks if not c.fits]
    needs = _needs(checks, measurement)
    notes = []
    if needs.get(Constraint.RAM) == math.inf:
        notes.append(
            "RAM: the runtime alone needs more than the budget; compressing the model cannot make it fit "
            f"(fp32 peak RSS {measurement.peak_rss_bytes} bytes, budget {profile.ram_budget_bytes})"
        )
    if Constraint.ACCURACY in violated:
        notes.append(
            "accuracy: the fp32 model itself is below the floor; compression with distillation as recovery cannot "
            "be expected to exceed its teacher: retrain or collect more data"
        )
    if profile.max_accuracy_drop is not None and z > 0:
        smallest = paired_drop_upper(np.ones(n_val, bool), np.ones(n_val, bool), z)[1]
        if smallest > profile.max_accuracy_drop:
            notes.append(
                f"accuracy: {n_val} held-out samples cannot certify a drop of at most "
                f"{profile.max_accuracy_drop:.2%} at this confidence (the smallest certifiable bound is "
                f"{smallest:.2%}); only the fp32 model can fit: give more validation data or lower the confidence"
            )
    if Constraint.LATENCY in violated and not profile.int8_dot_product:
        notes.append("latency: no int8 dot-product on this CPU, so only structural passes are used to cut latency")
    return ConstraintAnalysis(
        fp32_checks=checks,
        violated=violated,
        needs=needs,
        remedies={c: r for c, r in remedies(profile).items() if c in violated},
        export_opset=export_opset,
        notes=notes,
    )
