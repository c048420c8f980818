"""Health gates of a rollout: accuracy, p95 latency, inference error rate and job failure rate, judged on evidence.

Evidence is the telemetry rollups of the rollout's devices on the new model version inside the gate window, added
up exactly (latency as bucket counts: the p95 is the upper bound of the bucket holding the 95th percentile). A gate
judges only once enough devices and samples are in; until then it is `waiting`. Thresholds come from the
rollout's `GateConfig`, else from the class profile (see `accuracy_threshold`).

Example::

    evidence = collect_evidence(session, device_ids=["pi-1"], version=3, class_name="rpi4", since=t)
    results = judge(config, evidence=evidence, outcomes=Outcomes(assigned=4, done=4, failed=0, active_devices=4),
                    latency_budget_s=0.005, accuracy_floor=0.9)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Sequence

from sqlmodel import Session, col, select

from edgefleet.controller.data.tables import TelemetryRollup
from edgefleet.controller.rollout.plan import GateConfig
from edgefleet.protocols.profile import DeviceProfile
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS

__all__ = [
    "Evidence",
    "GateResult",
    "Outcomes",
    "accuracy_of_version",
    "accuracy_threshold",
    "collect_evidence",
    "judge",
    "p95_bound",
]

_NBUCKETS = len(LATENCY_BUCKETS_SECONDS) + 1
_LONGEST_WINDOW = dt.timedelta(hours=1)
PASS, BREACH, WAITING, OFF, WAIVED = "pass", "breach", "waiting", "off", "waived"


@dataclasses.dataclass(frozen=True, slots=True)
class GateResult:
    """One gate's verdict: `status` is pass, breach, waiting (not enough evidence), off (no threshold) or waived."""

    name: str
    status: str
    value: float | None
    threshold: float | None
    devices: int = 0
    samples: int = 0
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        value = self.value
        return {
            "name": self.name,
            "status": self.status,
            "value": "+Inf" if value is not None and math.isinf(value) else value,
            "threshold": self.threshold,
            "devices": self.devices,
            "samples": self.samples,
            "detail": self.detail,
        }


@dataclasses.dataclass(slots=True)
class Evidence:
    """Telemetry sums over the gate window for the rollout's devices on the new version."""

    devices: int = 0
    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    labelled_devices: int = 0
    counts: list[int] = dataclasses.field(default_factory=lambda: [0] * _NBUCKETS)
    reporting: set[str] = dataclasses.field(default_factory=set)  # devices with inferences or errors
    labelled_by: set[str] = dataclasses.field(default_factory=set)  # devices with labelled samples


@dataclasses.dataclass(frozen=True, slots=True)
class Outcomes:
    """Deploy outcomes so far: devices assigned to waves, done (any way), failed (failed, timed out, rolled back)."""

    assigned: int
    done: int
    failed: int
    active_devices: int


def p95_bound(counts: Sequence[int], *, quantile: float = 0.95) -> float:
    """The upper bound of the bucket holding the quantile (inf when it lies above the last bound; 0 when empty)."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = math.ceil(quantile * total)
    running = 0
    for i, count in enumerate(counts):
        running += count
        if running >= rank:
            return LATENCY_BUCKETS_SECONDS[i] if i < len(LATENCY_BUCKETS_SECONDS) else math.inf
    return math.inf


def _rows(
    session: Session, *, class_name: str, version: int, since: dt.datetime, device_ids: Sequence[str] | None
) -> list[TelemetryRollup]:
    # A rollup window counts when it ends after `since` (it holds some of the evidence asked for).
    query = select(TelemetryRollup).where(
        TelemetryRollup.class_name == class_name,
        TelemetryRollup.model_version == version,
        col(TelemetryRollup.window_start) >= since - _LONGEST_WINDOW,
    )
    if device_ids is not None:
        query = query.where(col(TelemetryRollup.device_id).in_(list(device_ids)))
    rows = session.exec(query).all()
    return [r for r in rows if r.window_start + dt.timedelta(seconds=r.window_seconds) > since]


def collect_evidence(
    session: Session, *, device_ids: Sequence[str], version: int, class_name: str, since: dt.datetime
) -> Evidence:
    evidence = Evidence()
    if not device_ids:
        return evidence
    reporting, labelled_by = evidence.reporting, evidence.labelled_by
    for row in _rows(session, class_name=class_name, version=version, since=since, device_ids=device_ids):
        evidence.inferences += row.inferences
        evidence.errors += row.errors
        evidence.labelled += row.labelled
        evidence.correct += row.correct
        if row.inferences or row.errors:
            reporting.add(row.device_id)
        if row.labelled:
            labelled_by.add(row.device_id)
        counts = json.loads(row.latency_counts_json) if row.latency_counts_json not in {"", "[]"} else []
        if len(counts) == _NBUCKETS:
            evidence.counts = [a + int(b) for a, b in zip(evidence.counts, counts, strict=True)]
    evidence.devices = len(reporting)
    evidence.labelled_devices = len(labelled_by)
    return evidence


def accuracy_of_version(
    session: Session, *, class_name: str, version: int, since: dt.datetime, min_labelled: int
) -> float | None:
    """Field accuracy of one model version on a class (all its devices), None with fewer labelled samples."""
    rows = _rows(session, class_name=class_name, version=version, since=since, device_ids=None)
    labelled = sum(r.labelled for r in rows)
    if labelled < min_labelled:
        return None
    return sum(r.correct for r in rows) / labelled


def accuracy_threshold(
    config: GateConfig,
    profile: DeviceProfile,
    *,
    previous_accuracy: float | None,
    artifact_accuracy: float | None,
) -> tuple[float | None, str]:
    """The accuracy floor and where it comes from; (None, why) when nothing gives one (the gate is off)."""
    if config.accuracy_floor is not None:
        return config.accuracy_floor, "rollout option"
    floors: list[tuple[float, str]] = []
    if profile.accuracy_floor is not None:
        floors.append((profile.accuracy_floor, "class floor"))
    drop = profile.max_accuracy_drop or 0.0
    if previous_accuracy is not None:
        floors.append((previous_accuracy - drop, f"previous model {previous_accuracy:.3f} - {drop:g}"))
    elif artifact_accuracy is not None:
        floors.append((artifact_accuracy - drop, f"measured {artifact_accuracy:.3f} - {drop:g}"))
    if not floors:
        return None, "no floor: the class has none and nothing to compare with"
    return max(floors)


def _needed_devices(config: GateConfig, outcomes: Outcomes) -> int:
    # A class smaller than min_devices is judged on all its updated devices.
    return max(1, min(config.min_devices, outcomes.active_devices))


def judge(
    config: GateConfig,
    *,
    evidence: Evidence,
    outcomes: Outcomes,
    latency_budget_s: float,
    accuracy_floor: float | None,
) -> list[GateResult]:
    """Every gate's verdict on the evidence (waived gates are reported but never breach)."""
    results = [
        _accuracy(config, evidence, outcomes, accuracy_floor),
        _latency(config, evidence, outcomes, latency_budget_s),
        _errors(config, evidence, outcomes),
        _failures(config, outcomes),
    ]
    return [
        dataclasses.replace(r, status=WAIVED) if r.name in config.waived and r.status != OFF else r for r in results
    ]


def _accuracy(config: GateConfig, ev: Evidence, outcomes: Outcomes, floor: float | None) -> GateResult:
    if floor is None:
        return GateResult("accuracy", OFF, None, None, detail="no accuracy floor for this class")
    value = ev.correct / ev.labelled if ev.labelled else None
    needed = _needed_devices(config, outcomes)
    if ev.labelled < config.min_labelled or ev.labelled_devices < needed:
        detail = f"needs {config.min_labelled} labelled samples from {needed} device(s)"
        return GateResult("accuracy", WAITING, value, floor, ev.labelled_devices, ev.labelled, detail)
    status = PASS if value is not None and value >= floor else BREACH
    return GateResult("accuracy", status, value, floor, ev.labelled_devices, ev.labelled)


def _latency(config: GateConfig, ev: Evidence, outcomes: Outcomes, budget_s: float) -> GateResult:
    threshold = config.latency_p95_ms / 1000 if config.latency_p95_ms is not None else budget_s
    value = p95_bound(ev.counts) if sum(ev.counts) else None
    needed = _needed_devices(config, outcomes)
    if ev.inferences < config.min_samples or ev.devices < needed:
        detail = f"needs {config.min_samples} inferences from {needed} device(s)"
        return GateResult("latency_p95", WAITING, value, threshold, ev.devices, ev.inferences, detail)
    status = PASS if value is not None and value <= threshold else BREACH
    return GateResult("latency_p95", status, value, threshold, ev.devices, ev.inferences)


def _errors(config: GateConfig, ev: Evidence, outcomes: Outcomes) -> GateResult:
    # Errors per inference (Prometheus' error_rate); a model that only errors has no inferences: +Inf.
    attempts = ev.inferences + ev.errors
    value = ev.errors / ev.inferences if ev.inferences else (math.inf if ev.errors else None)
    needed = _needed_devices(config, outcomes)
    if attempts < config.min_samples or ev.devices < needed:
        detail = f"needs {config.min_samples} inferences from {needed} device(s)"
        return GateResult("error_rate", WAITING, value, config.max_error_rate, ev.devices, attempts, detail)
    status = PASS if value is not None and value <= config.max_error_rate else BREACH
    return GateResult("error_rate", status, value, config.max_error_rate, ev.devices, attempts)


def _failures(config: GateConfig, outcomes: Outcomes) -> GateResult:
    value = outcomes.failed / outcomes.done if outcomes.done else None
    needed = max(1, min(config.min_devices, outcomes.assigned))
    if outcomes.done < needed:
        detail = f"needs {needed} finished deploy(s)"
        return GateResult("job_failure_rate", WAITING, value, config.max_failure_rate, outcomes.done, 0, detail)
    status = PASS if value is not None and value <= config.max_failure_rate else BREACH
    return GateResult("job_failure_rate", status, value, config.max_failure_rate, outcomes.done, outcomes.done)
