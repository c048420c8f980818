"""Prometheus metrics of the controller; every metric lives in the `CollectorRegistry` passed in.

Latency arrives from agents as counts in the fixed buckets of `LATENCY_BUCKETS_SECONDS`; the histogram
`edgefleet_inference_latency_seconds` adds those counts per (class, model, model version) exactly, and is
exposed by a custom collector as cumulative buckets plus sum and count. Labels are bounded: device class,
model, model version, message kind, reason, outcome, state. Never a device id.

Example::

    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry=registry)
    metrics.record_telemetry("rpi4", "mnist", 3, batch)
    registry.get_sample_value("edgefleet_inference_latency_seconds_count",
                              {"device_class": "rpi4", "model": "mnist", "model_version": "3"})
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, TelemetryBatch

__all__ = ["ControllerMetrics", "StateCounts"]

_BOUNDS = (*(f"{b:g}" for b in LATENCY_BUCKETS_SECONDS), "+Inf")
_MODEL_LABELS = ("device_class", "model", "model_version")

# Callables that count rows by state at scrape time (from the database, so every replica reports the same).
StateCounts = Callable[[], Mapping[tuple[str, ...], int]]


@dataclass(slots=True)
class _ModelStats:
    buckets: list[int] = field(default_factory=lambda: [0] * len(_BOUNDS))
    latency_sum: float = 0.0
    labelled: int = 0
    correct: int = 0
    confidence_weighted: float = 0.0
    confidence_weight: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class _TelemetryCollector(Collector):
    """Exposes the merged telemetry per (class, model, version)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stats: dict[tuple[str, str, str], _ModelStats] = {}

    def collect(self) -> Iterable[HistogramMetricFamily | CounterMetricFamily | GaugeMetricFamily]:
        hist = HistogramMetricFamily(
            "edgefleet_inference_latency_seconds",
            "Inference latency on devices, merged exactly from the agents' bucket counts.",
            labels=_MODEL_LABELS,
        )
        labelled = CounterMetricFamily(
            "edgefleet_labelled_samples", "Inferences on labelled samples.", labels=_MODEL_LABELS
        )
        correct = CounterMetricFamily(
            "edgefleet_correct_predictions", "Labelled samples predicted correctly.", labels=_MODEL_LABELS
        )
        accuracy = GaugeMetricFamily(
            "edgefleet_model_accuracy_ratio", "Accuracy on labelled samples so far.", labels=_MODEL_LABELS
        )
        confidence = GaugeMetricFamily(
            "edgefleet_top1_confidence_mean", "Mean top-1 confidence, weighted by inferences.", labels=_MODEL_LABELS
        )
        errors = CounterMetricFamily(
            "edgefleet_device_errors", "Errors counted by agents, by kind.", labels=(*_MODEL_LABELS, "kind")
        )
        with self.lock:
            items = [(k, _copy(v)) for k, v in self.stats.items()]
        for labels, s in items:
            cumulative, running = [], 0
            for bound, count in zip(_BOUNDS, s.buckets, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            hist.add_metric(list(labels), cumulative, s.latency_sum)
            labelled.add_metric(list(labels), s.labelled)
            correct.add_metric(list(labels), s.correct)
            if s.labelled:
                accuracy.add_metric(list(labels), s.correct / s.labelled)
            if s.confidence_weight:
                confidence.add_metric(list(labels), s.confidence_weighted / s.confidence_weight)
            for kind, n in sorted(s.errors.items()):
                errors.add_metric([*labels, kind], n)
        return [hist, labelled, correct, accuracy, confidence, errors]


def _copy(s: _ModelStats) -> _ModelStats:
    return _ModelStats(
        list(s.buckets),
        s.latency_sum,
        s.labelled,
        s.correct,
        s.confidence_weighted,
        s.confidence_weight,
        dict(s.errors),
    )


class _StateCollector(Collector):
    """A gauge family whose values come from a callable at scrape time (devices or jobs by state)."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], source: StateCounts) -> None:
        self.name, self.doc, self.labels, self.source = name, doc, labels, source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        try:
            counts = self.source()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is busy
            counts = {}
        for labels, n in sorted(counts.items()):
            family.add_metric(list(labels), n)
        return [family]


class ControllerMetrics:
    """All controller metrics in one registry; the service calls the `record_*` methods."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        device_states: StateCounts | None = None,
        job_states: StateCounts | None = None,
    ) -> None:
        self.registry = registry
        self._telemetry = _TelemetryCollector()
        registry.register(self._telemetry)
        self.messages_accepted = Counter(
            "edgefleet_messages_accepted_total", "Device messages accepted, by kind.", ["kind"], registry=registry
        )
        self.messages_rejected = Counter(
            "edgefleet_messages_rejected_total",
            "Device messages rejected, by kind and reason.",
            ["kind", "reason"],
            registry=registry,
        )
        self.artifact_bytes = Counter(
            "edgefleet_artifact_bytes_served_total",
            "Artifact block bytes published to devices.",
            ["device_class"],
            registry=registry,
        )
        self.commands = Counter(
            "edgefleet_commands_published_total", "Commands published to devices.", ["type"], registry=registry
        )
        if device_states is not None:
            registry.register(
                _StateCollector(
                    "edgefleet_devices",
                    "Registered devices by class and state.",
                    ("device_class", "state"),
                    device_states,
                )
            )
        if job_states is not None:
            registry.register(_StateCollector("edgefleet_jobs", "Deployment jobs by state.", ("state",), job_states))

    def accepted(self, kind: str) -> None:
        self.messages_accepted.labels(kind).inc()

    def rejected(self, kind: str, reason: str) -> None:
        self.messages_rejected.labels(kind, reason).inc()

    def bytes_served(self, device_class: str, n: int) -> None:
        self.artifact_bytes.labels(device_class).inc(n)

    def record_telemetry(self, device_class: str, model: str, model_version: int | None, batch: TelemetryBatch) -> None:
        """Add one batch's bucket counts, accuracy, confidence and errors to its (class, model, version)."""
        key = (device_class, model, str(model_version) if model_version is not None else "none")
        with self._telemetry.lock:
            stats = self._telemetry.stats.get(key)
            if stats is None:
                stats = self._telemetry.stats[key] = _ModelStats()
            stats.buckets = list(map(operator.add, stats.buckets, batch.latency_counts))
            stats.latency_sum += batch.latency_sum_seconds
            stats.labelled += batch.labelled_count
            stats.correct += batch.correct_count
            if batch.mean_top1_confidence is not None and batch.inference_count:
                stats.confidence_weighted += batch.mean_top1_confidence * batch.inference_count
                stats.confidence_weight += batch.inference_count
            if batch.errors:
                for kind, n in batch.errors.items():
                    stats.errors[kind.value] = stats.errors.get(kind.value, 0) + n
