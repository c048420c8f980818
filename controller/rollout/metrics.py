"""Prometheus metrics of rollouts, read from the database at scrape time (every replica reports the same).

Names and labels are the contract in docs/operations.md ("Metrics contract for rollouts"): rollout state, wave
index and count, devices per wave by outcome, each gate's value, threshold and breach, recompressions awaiting
approval, and the class latency budget. Finished rollouts are dropped a day after they end. Labels are bounded:
never a device id.

Example::

    registry.register(RolloutCollector(db))
    registry.get_sample_value("edgefleet_rollout_wave_index", {"rollout": "3"})
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlmodel import col, or_, select

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import profile_of
from edgefleet.controller.data.states import RolloutState, RowState
from edgefleet.controller.data.tables import Artifact, DeviceClass, Recompression, Rollout, RolloutDevice, utcnow
from edgefleet.controller.rollout.gates import accuracy_threshold
from edgefleet.controller.rollout.plan import GateConfig
from edgefleet.controller.rollout.status import wave_label
from edgefleet.protocols.profile import DeviceProfile

__all__ = ["RolloutCollector", "outcome_of"]

log = logging.getLogger(__name__)

KEEP_FINISHED = dt.timedelta(days=1)
_OUTCOMES = ("pending", "active", "failed", "timed_out", "rolled_back")
_OUTCOME = {
    RowState.PENDING: "pending",
    RowState.IN_PROGRESS: "pending",
    RowState.ACTIVE: "active",
    RowState.ROLLBACK_PENDING: "active",  # still on the new model until the rollback lands
    RowState.ROLLING_BACK: "active",
    RowState.FAILED: "failed",
    RowState.ROLLBACK_FAILED: "failed",
    RowState.NO_PREVIOUS_MODEL: "active",  # an aborted first model: nothing to go back to, the device keeps it
    RowState.TIMED_OUT: "timed_out",
    RowState.ROLLED_BACK: "rolled_back",
}


def outcome_of(state: str) -> str | None:
    """The contract's outcome label for a device row state (None for cancelled devices, never sent anything)."""
    try:
        return _OUTCOME.get(RowState(state))
    except ValueError:
        return None


class RolloutCollector(Collector):
    """Collects the rollout gauges from the registry; a scrape never fails because the database is busy."""

    def __init__(self, db: Database, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {
            "state": GaugeMetricFamily(
                "edgefleet_rollout_state",
                "1 for the rollout's current state, 0 for the others.",
                labels=("rollout", "device_class", "model", "model_version", "state"),
            ),
            "wave": GaugeMetricFamily(
                "edgefleet_rollout_wave_index", "The wave being rolled out, 0 for the canary.", labels=("rollout",)
            ),
            "waves": GaugeMetricFamily("edgefleet_rollout_wave_count", "Waves planned.", labels=("rollout",)),
            "devices": GaugeMetricFamily(
                "edgefleet_rollout_devices", "Devices of a wave by outcome.", labels=("rollout", "wave", "outcome")
            ),
            "value": GaugeMetricFamily(
                "edgefleet_rollout_gate_value", "The gate's measured value.", labels=("rollout", "gate")
            ),
            "threshold": GaugeMetricFamily(
                "edgefleet_rollout_gate_threshold", "The gate's threshold.", labels=("rollout", "gate")
            ),
            "breached": GaugeMetricFamily(
                "edgefleet_rollout_gate_breached", "1 when the gate was judged and failed.", labels=("rollout", "gate")
            ),
            "recompression": GaugeMetricFamily(
                "edgefleet_recompression_pending",
                "Recompressed artifacts waiting for an operator's approval.",
                labels=("device_class", "model"),
            ),
            "budget": GaugeMetricFamily(
                "edgefleet_class_latency_budget_seconds",
                "The class profile's p95 latency budget.",
                labels=("device_class",),
            ),
            "floor": GaugeMetricFamily(
                "edgefleet_accuracy_floor_ratio",
                "The accuracy an artifact must hold in the field (the accuracy gate's floor without a rollout option).",
                labels=("device_class", "model", "model_version"),
            ),
        }
        try:
            self._fill(families)
        except Exception:  # a scrape must not fail because the database is busy
            log.debug("rollout metrics unavailable", exc_info=True)
        return list(families.values())

    def _fill(self, f: dict[str, GaugeMetricFamily]) -> None:
        cutoff = self.clock() - KEEP_FINISHED
        with self.db.reading("collecting rollout metrics") as session:
            rollouts = session.exec(
                select(Rollout).where(or_(col(Rollout.finished_at).is_(None), col(Rollout.finished_at) >= cutoff))
            ).all()
            for rollout in rollouts:
                artifact = session.get(Artifact, rollout.artifact_id)
                rows = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)).all()
                self._rollout(f, rollout, artifact, [(r.wave, r.state) for r in rows])
            pending = Counter(
                (r.class_name, r.model_name) for r in session.exec(select(Recompression)).all() if r.state == "pending"
            )
            profiles = {row.name: profile_of(row) for row in session.exec(select(DeviceClass)).all()}
            for name, profile in profiles.items():
                f["budget"].add_metric([name], profile.latency_budget_ms / 1000)
            self._floors(f["floor"], session.exec(select(Artifact)).all(), profiles)
            for (class_name, model), n in sorted(pending.items()):
                f["recompression"].add_metric([class_name, model], n)

    @staticmethod
    def _floors(family: GaugeMetricFamily, artifacts: Iterable[Artifact], profiles: dict[str, DeviceProfile]) -> None:
        """Per artifact, the floor the gates use: the class floor, or the measured accuracy less the allowed drop."""
        for artifact in artifacts:
            profile = profiles.get(artifact.class_name)
            if profile is None:
                continue
            measured = json.loads(artifact.metrics_json or "{}").get("accuracy")
            floor, _ = accuracy_threshold(
                GateConfig(),
                profile,
                previous_accuracy=None,
                artifact_accuracy=float(measured) if isinstance(measured, int | float) else None,
            )
            if floor is not None:
                family.add_metric([artifact.class_name, artifact.model_name, str(artifact.version)], floor)

    @staticmethod
    def _rollout(
        f: dict[str, GaugeMetricFamily], rollout: Rollout, artifact: Artifact | None, rows: list[tuple[int, str]]
    ) -> None:
        rid = str(rollout.id)
        model = artifact.model_name if artifact else ""
        version = str(artifact.version) if artifact else ""
        for state in RolloutState:
            f["state"].add_metric(
                [rid, rollout.class_name, model, version, state.value], 1.0 if rollout.state == state else 0.0
            )
        f["wave"].add_metric([rid], max(rollout.current_wave, 0))
        f["waves"].add_metric([rid], rollout.wave_count)
        counts = Counter((wave, outcome_of(state)) for wave, state in rows)
        for wave in sorted({w for w, _ in rows}):
            for outcome in _OUTCOMES:
                f["devices"].add_metric([rid, wave_label(wave), outcome], counts.get((wave, outcome), 0))
        for gate in json.loads(rollout.gate_results_json or "{}").get("gates", []):
            labels = [rid, gate["name"]]
            value = gate["value"]
            if value is not None:
                f["value"].add_metric(labels, math.inf if value == "+Inf" else float(value))
            if gate["threshold"] is not None:
                f["threshold"].add_metric(labels, float(gate["threshold"]))
            f["breached"].add_metric(labels, 1.0 if gate["status"] == "breach" else 0.0)
