"""Recompression policies per class (the `[policy]` table of the class TOML) and the triggers they define.

A trigger looks at the class's current model in the field: its p95 latency over the class budget for K consecutive
telemetry windows, its accuracy on labelled samples below the floor, its deploys failing with out of memory or
validation failures above a rate, and the devices' speed measured in the field (field p95 over the p95 the planner
predicted from the profile's reference times) differing from the prediction by more than a tolerance. `detect`
returns the first trigger that fires, with its evidence.

Example class TOML::

    [policy]
    latency_windows = 3
    max_oom_rate = 0.05
    speed_factor_tolerance = 0.3   # or false: no speed-factor trigger
    mode = "approve"        # or "auto": roll the new artifact out without asking
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlmodel import Session, col, select

from edgefleet.controller.data.tables import Artifact, DeploymentJob, TelemetryRollup
from edgefleet.controller.errors import ConfigError
from edgefleet.controller.rollout.gates import p95_bound
from edgefleet.protocols.errors import ProfileError, describe_problems
from edgefleet.protocols.profile import MAX_PROFILE_FILE_BYTES, DeviceProfile, read_profile_file
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS

__all__ = ["RecompressionPolicy", "Trigger", "detect", "load_policy", "parse_policy", "policy_of_file"]

_NBUCKETS = len(LATENCY_BUCKETS_SECONDS) + 1
MAX_POLICY_FILE_BYTES = MAX_PROFILE_FILE_BYTES  # the policy lives in the class TOML


class RecompressionPolicy(BaseModel):
    """When a class's model no longer fits, and what to do then."""

    # strict: `latency_windows = true` or `lookback_s = "60"` is refused, not coerced (an int still fits a float)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    latency_windows: Annotated[int, Field(ge=1, le=1000)] = 3
    accuracy: bool = True
    max_oom_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_validation_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.2
    speed_factor_tolerance: Annotated[float | None, Field(gt=0, le=100)] = 0.3
    min_samples: Annotated[int, Field(ge=1)] = 100
    min_labelled: Annotated[int, Field(ge=1)] = 100
    min_jobs: Annotated[int, Field(ge=1)] = 5
    lookback_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 3600.0
    cooldown_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 3600.0
    mode: Literal["approve", "auto"] = "approve"

    @field_validator("speed_factor_tolerance", mode="before")
    @classmethod
    def _false_is_off(cls, value: Any) -> Any:
        """TOML has no null: `speed_factor_tolerance = false` turns the speed-factor trigger off."""
        if value is False:
            return None
        if value is True:
            raise ValueError("use a tolerance (e.g. 0.3) to turn it on, or false to turn it off")
        return value


def load_policy(path: Path) -> RecompressionPolicy:
    """The `[policy]` table of a class TOML; errors name the file and the field."""
    found = policy_of_file(path)
    if found is None:
        raise ConfigError(f"{path}: no [policy] table")
    return found


def policy_of_file(path: Path) -> RecompressionPolicy | None:
    """The `[policy]` table of a class TOML, or None when it has none; a broken table is a `ConfigError`."""
    try:
        document = read_profile_file(path)  # bounded: /dev/zero or a huge file is refused, not read whole
    except ProfileError as exc:
        raise ConfigError(str(exc)) from exc
    return parse_policy(document, source=str(path))


def parse_policy(document: dict[str, Any], *, source: str = "<policy>") -> RecompressionPolicy | None:
    """Validate the `[policy]` table of a parsed class TOML (None when absent); errors name the source and field."""
    if "policy" not in document:
        return None
    table = document["policy"]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: `policy` must be a table ([policy]), not a {type(table).__name__}")
    try:
        return RecompressionPolicy.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(f"{source}: [policy] {describe_problems(exc, subject='policy')}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class Trigger:
    """Why the class needs a new model; `speed_correction` (the profile's, times field/predicted) updates the class
    profile when measured, so the build predicts from the speed the field shows."""

    kind: str
    summary: str
    evidence: dict[str, Any]
    speed_correction: float | None = None


def _windows(
    session: Session, class_name: str, version: int, since: dt.datetime
) -> dict[dt.datetime, tuple[int, int, int, list[int]]]:
    """Per rollup window: (inferences, labelled, correct, merged latency counts) of the class on that version."""
    rows = session.exec(
        select(TelemetryRollup).where(
            TelemetryRollup.class_name == class_name,
            TelemetryRollup.model_version == version,
            col(TelemetryRollup.window_start) >= since,
        )
    ).all()
    sums: dict[dt.datetime, list[Any]] = defaultdict(lambda: [0, 0, 0, [0] * _NBUCKETS])
    for row in rows:
        acc = sums[row.window_start]
        acc[0] += row.inferences
        acc[1] += row.labelled
        acc[2] += row.correct
        counts = json.loads(row.latency_counts_json) if row.latency_counts_json not in {"", "[]"} else []
        if len(counts) == _NBUCKETS:
            acc[3] = [a + int(b) for a, b in zip(acc[3], counts, strict=True)]
    return {w: (a[0], a[1], a[2], a[3]) for w, a in sums.items()}


def detect(
    session: Session,
    *,
    artifact: Artifact,
    profile: DeviceProfile,
    policy: RecompressionPolicy,
    now: dt.datetime,
) -> Trigger | None:
    """The first trigger that fires for the class's current artifact, or None."""
    since = now - dt.timedelta(seconds=policy.lookback_s)
    windows = _windows(session, artifact.class_name, artifact.version, since)
    for check in (_latency, _speed_factor, _accuracy):
        found = check(windows, artifact=artifact, profile=profile, policy=policy)
        if found is not None:
            return found
    return _job_failures(session, artifact=artifact, policy=policy, since=since)


def _latency(windows: dict[dt.datetime, Any], **kw: Any) -> Trigger | None:
    profile: DeviceProfile = kw["profile"]
    policy: RecompressionPolicy = kw["policy"]
    judged = [(w, p95_bound(v[3])) for w, v in sorted(windows.items()) if v[0] >= policy.min_samples]
    last = judged[-policy.latency_windows :]
    budget = profile.latency_budget_ms / 1000
    if len(last) < policy.latency_windows or not all(p95 > budget for _, p95 in last):
        return None
    values = [p95 for _, p95 in last]
    return Trigger(
        "latency",
        f"p95 {values[-1] * 1000:g} ms over the {profile.latency_budget_ms:g} ms budget for {len(last)} windows",
        {"p95_s": values, "budget_s": budget, "windows": [w.isoformat() for w, _ in last]},
        speed_correction=_corrected(windows, **kw),
    )


def _corrected(windows: dict[dt.datetime, Any], **kw: Any) -> float | None:
    ratio = _field_over_predicted(windows, **kw)
    profile: DeviceProfile = kw["profile"]
    return None if ratio is None else profile.speed_correction * ratio


def _field_over_predicted(windows: dict[dt.datetime, Any], **kw: Any) -> float | None:
    """Field p95 (its telemetry bucket bound) / the p95 the artifact was predicted to have on the device."""
    artifact: Artifact = kw["artifact"]
    metrics = json.loads(artifact.metrics_json or "{}")
    predicted_ms = metrics.get("predicted_p95_ms")
    if not isinstance(predicted_ms, int | float) or predicted_ms <= 0:
        return None
    counts = [0] * _NBUCKETS
    for v in windows.values():
        counts = [a + b for a, b in zip(counts, v[3], strict=True)]
    if sum(counts) == 0:
        return None
    return float(p95_bound(counts) * 1000 / predicted_ms)


def _speed_factor(windows: dict[dt.datetime, Any], **kw: Any) -> Trigger | None:
    profile: DeviceProfile = kw["profile"]
    policy: RecompressionPolicy = kw["policy"]
    if policy.speed_factor_tolerance is None or sum(v[0] for v in windows.values()) < policy.min_samples:
        return None
    ratio = _field_over_predicted(windows, **kw)
    if ratio is None or abs(ratio - 1) <= policy.speed_factor_tolerance:
        return None
    return Trigger(
        "speed_factor",
        f"devices run {ratio:.2g}x the p95 predicted from the profile's reference times",
        {"field_over_predicted": ratio, "correction": profile.speed_correction,
         "tolerance": policy.speed_factor_tolerance},
        speed_correction=profile.speed_correction * ratio,
    )  # fmt: skip


def _accuracy(windows: dict[dt.datetime, Any], **kw: Any) -> Trigger | None:
    profile: DeviceProfile = kw["profile"]
    policy: RecompressionPolicy = kw["policy"]
    artifact: Artifact = kw["artifact"]
    labelled = sum(v[1] for v in windows.values())
    if not policy.accuracy or labelled < policy.min_labelled:
        return None
    measured = json.loads(artifact.metrics_json or "{}").get("accuracy")
    floors = [profile.accuracy_floor] if profile.accuracy_floor is not None else []
    if isinstance(measured, int | float):
        floors.append(float(measured) - (profile.max_accuracy_drop or 0.0))
    if not floors:
        return None
    accuracy = sum(v[2] for v in windows.values()) / labelled
    if accuracy >= max(floors):
        return None
    return Trigger(
        "accuracy",
        f"accuracy {accuracy:.3f} below the floor {max(floors):.3f}",
        {"accuracy": accuracy, "floor": max(floors), "labelled": labelled},
    )


def _job_failures(
    session: Session, *, artifact: Artifact, policy: RecompressionPolicy, since: dt.datetime
) -> Trigger | None:
    jobs = session.exec(
        select(DeploymentJob.result_code).where(
            DeploymentJob.artifact_id == artifact.id,
            col(DeploymentJob.finished_at).is_not(None),
            col(DeploymentJob.finished_at) >= since,
        )
    ).all()
    if len(jobs) < policy.min_jobs:
        return None
    for code, limit in (
        ("out_of_memory", policy.max_oom_rate),
        ("validation_failed", policy.max_validation_failure_rate),
    ):
        rate = sum(1 for c in jobs if c == code) / len(jobs)
        if rate > limit:
            return Trigger(
                code, f"{rate:.0%} of deploys end in {code}", {"rate": rate, "limit": limit, "jobs": len(jobs)}
            )
    return None
