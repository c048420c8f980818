"""The demo's story as data: the wave plan and gates of its rollouts, the recompression policy it sets, and the
field numbers it watches (a class's recent p95 from the telemetry rollups, the state of its rollouts and the breach
that stopped one), and the registry's artifacts of a class (every version built, by whom, its latest rollout).

Everything here is sized so that the whole story fits in a few minutes: devices report every two seconds, a gate
judges once two devices sent 45 inferences (30 labelled), and the recompression trigger needs three consecutive
five-second rollup windows over budget. A real fleet keeps the defaults (minutes, hundreds of samples).

Example::

    plan, gates = rollout_plan(10), rollout_gates(accuracy_floor=0.9)
    Rollouts(db, actor="demo").start(artifact_id, plan=plan, gates=gates, on_breach="abort")
    recent_p95_ms(db, "rpi4", version=1, seconds=10)
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sqlmodel import col, select

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.states import FINAL_ROLLOUT_STATES, FINAL_ROW_STATES
from edgefleet.controller.data.tables import Artifact, Recompression, Rollout, RolloutDevice, TelemetryRollup, utcnow
from edgefleet.controller.demo.report import Breach, histogram_quantile
from edgefleet.controller.recompress.policy import RecompressionPolicy
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS

__all__ = [
    "ACCURACY_MARGIN",
    "ArtifactFacts",
    "Recent",
    "RolloutOutcome",
    "class_artifacts",
    "demo_policy",
    "recent",
    "recent_p95_ms",
    "recompressions",
    "rollout_gates",
    "rollout_outcome",
    "rollout_plan",
]

ACCURACY_MARGIN = 0.08
"""The demo's accuracy floor is this far below the model's measured accuracy: wide enough for the noise of a few
dozen labelled samples, far above what a model with swapped labels reaches (about 40% on the digits)."""


def rollout_plan(devices: int, *, timeout_s: float = 60.0) -> WavePlan:
    """A canary of 2 devices (1 in a class of 3 or fewer), then waves doubling; 10 downloads at once."""
    return WavePlan(canary="2" if devices > 3 else "1", growth=2.0, max_concurrent=10, device_timeout_s=timeout_s)


def rollout_gates(*, accuracy_floor: float | None) -> GateConfig:
    """Gates that judge within seconds: 2 devices, 45 inferences (a p95 of fewer is about their maximum: one
    scheduling hiccup of the busy host would stop a rollout), 30 labelled samples, a 30 s window."""
    return GateConfig(
        window_s=30.0,
        min_devices=2,
        min_samples=45,
        min_labelled=30,
        accuracy_floor=accuracy_floor,
        data_wait_s=60.0,
    )


def demo_policy(*, latency_windows: int = 3, min_samples: int = 60) -> RecompressionPolicy:
    """Automatic recompression on p95 over budget for `latency_windows` consecutive windows of at least
    `min_samples` inferences each (the p95 of fewer is about their maximum: a busy host's hiccups would trigger it);
    accuracy is the rollout gates' business in the demo (a few dozen samples are too noisy for a second judge)."""
    return RecompressionPolicy(
        latency_windows=latency_windows,
        accuracy=False,
        speed_factor_tolerance=None,
        min_samples=min_samples,
        min_labelled=min_samples,
        lookback_s=30.0,
        cooldown_s=3600.0,
        mode="auto",
    )


@dataclass(frozen=True, slots=True)
class Recent:
    """A version's field numbers over the last seconds: p95 (ms), accuracy, labelled samples, inferences."""

    p95_ms: float | None
    accuracy: float | None
    labelled: int
    inferences: int


def recent(db: Database, class_name: str, *, version: int, seconds: float) -> Recent:
    """One model version on a class over the last `seconds`, from the telemetry rollups: the p95 from the merged
    bucket counts (interpolated within the bucket, as Prometheus' `histogram_quantile`), the labelled accuracy."""
    since = utcnow() - dt.timedelta(seconds=seconds)
    with db.reading(f"reading the recent telemetry of {class_name}") as session:
        rows = session.exec(
            select(
                TelemetryRollup.latency_counts_json,
                TelemetryRollup.labelled,
                TelemetryRollup.correct,
                TelemetryRollup.inferences,
            ).where(
                TelemetryRollup.class_name == class_name,
                TelemetryRollup.model_version == version,
                col(TelemetryRollup.window_start) >= since,
            )
        ).all()
    counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
    labelled = correct = inferences = 0
    for text, row_labelled, row_correct, row_inferences in rows:
        values = json.loads(text) if text not in {"", "[]"} else []
        if len(values) == len(counts):
            counts = [a + int(b) for a, b in zip(counts, values, strict=True)]
        labelled, correct, inferences = labelled + row_labelled, correct + row_correct, inferences + row_inferences
    cumulative, running = [], 0
    for bound, count in zip((*LATENCY_BUCKETS_SECONDS, float("inf")), counts, strict=True):
        running += count
        cumulative.append((bound, float(running)))
    p95 = histogram_quantile(0.95, cumulative)
    return Recent(
        p95_ms=p95 * 1000.0 if p95 is not None else None,
        accuracy=correct / labelled if labelled else None,
        labelled=labelled,
        inferences=inferences,
    )


def recent_p95_ms(db: Database, class_name: str, *, version: int, seconds: float) -> float | None:
    """p95 latency (ms) of one model version on a class over the last `seconds`; None without samples."""
    return recent(db, class_name, version=version, seconds=seconds).p95_ms


@dataclass(frozen=True, slots=True)
class RolloutOutcome:
    """Where a rollout ended: its state, devices per state, and whether every device reached a final state."""

    rollout_id: int
    state: str
    version: int
    devices: dict[str, int]
    waves_opened: int
    settled: bool
    breach: Breach | None

    @property
    def final(self) -> bool:
        return self.state in FINAL_ROLLOUT_STATES and self.settled


def rollout_outcome(db: Database, rollout_id: int, *, version: int) -> RolloutOutcome:
    with db.reading(f"reading rollout {rollout_id}") as session:
        rollout = session.get(Rollout, rollout_id)
        rows = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all()
    states: dict[str, int] = {}
    for row in rows:
        states[row.state] = states.get(row.state, 0) + 1
    breach = Breach.from_json(json.loads(rollout.breach_json)) if rollout is not None and rollout.breach_json else None
    return RolloutOutcome(
        rollout_id=rollout_id,
        state=rollout.state if rollout is not None else "missing",
        version=version,
        devices=dict(sorted(states.items())),
        waves_opened=(rollout.current_wave + 1) if rollout is not None else 0,
        settled=all(r.state in FINAL_ROW_STATES for r in rows),
        breach=breach,
    )


def recompressions(db: Database, class_name: str) -> list[Recompression]:
    """The class's recompressions, oldest first."""
    with db.reading(f"listing the recompressions of {class_name}") as session:
        query = select(Recompression).where(Recompression.class_name == class_name).order_by(col(Recompression.id))
        return list(session.exec(query).all())


@dataclass(frozen=True, slots=True)
class ArtifactFacts:
    """An artifact of a class as the registry holds it: every version built, by whom, and its latest rollout."""

    artifact_id: int
    version: int
    size: int
    recipe: str  # the passes as the report names them ("distill w0.25 > quantize_static")
    accuracy: float | None  # as measured when it was built
    created_at: dt.datetime
    rollout_id: int | None
    recompression_id: int | None  # the recompression that built it
    trigger: str | None


def recipe_label(recipe_json: str) -> str:
    """`distill w0.25 > quantize_static` from an artifact's stored passes; `-` for an artifact without a recipe."""
    data = json.loads(recipe_json or "[]")
    passes = data.get("passes", []) if isinstance(data, dict) else data
    names = []
    for p in passes if isinstance(passes, list) else []:
        kind, width = str(p.get("kind", "?")), p.get("width")
        names.append(f"{kind} w{width:g}" if isinstance(width, int | float) else kind)
    return " > ".join(names) or "-"


def class_artifacts(db: Database, class_name: str) -> list[ArtifactFacts]:
    """Every artifact built for the class, oldest version first, with its latest rollout and its recompression."""
    with db.reading(f"reading the artifacts of {class_name}") as session:
        artifacts = session.exec(
            select(Artifact).where(Artifact.class_name == class_name).order_by(col(Artifact.version))
        ).all()
        ids = [a.id for a in artifacts]
        rollouts = session.exec(
            select(Rollout.artifact_id, Rollout.id).where(col(Rollout.artifact_id).in_(ids)).order_by(col(Rollout.id))
        ).all()
        built = session.exec(
            select(Recompression).where(col(Recompression.artifact_id).in_(ids)).order_by(col(Recompression.id))
        ).all()
    latest = dict(rollouts)  # ordered by id: the last rollout of each artifact wins
    by_recompression = {r.artifact_id: r for r in built}
    facts = []
    for a in artifacts:
        artifact_id = a.id or 0  # stored rows have one
        metrics = json.loads(a.metrics_json or "{}")
        accuracy = metrics.get("accuracy") if isinstance(metrics, dict) else None
        made = by_recompression.get(artifact_id)
        facts.append(
            ArtifactFacts(
                artifact_id=artifact_id,
                version=a.version,
                size=a.size,
                recipe=recipe_label(a.recipe_json),
                accuracy=float(accuracy) if isinstance(accuracy, int | float) else None,
                created_at=a.created_at,
                rollout_id=latest.get(artifact_id),
                recompression_id=made.id if made is not None else None,
                trigger=made.trigger if made is not None else None,
            )
        )
    return facts
