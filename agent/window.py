"""Accumulating one telemetry window: counts, latency bucket counts, labelled accuracy, confidence, errors.

Latency goes into fixed buckets (the controller's Prometheus histogram boundaries) as plain counts, so the
controller can add windows from many devices exactly; percentiles could not be added.

Example::

    window = Window(buckets=(0.001, 0.005, 0.01), started=clock())
    window.record(latency_s=0.003, confidence=0.9, correct=True)
    snapshot = window.close(ended=clock())
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Window", "WindowSnapshot"]


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    started: float
    ended: float
    inferences: int
    bucket_counts: tuple[int, ...]  # one per boundary plus the +Inf bucket; not cumulative
    latency_sum_s: float
    labelled: int
    correct: int
    confidence_sum: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.inferences if self.inferences else None


class Window:
    """Counts for one window; `record` is O(log buckets) and allocates nothing."""

    __slots__ = (
        "_buckets",
        "_counts",
        "_errors",
        "confidence_sum",
        "correct",
        "inferences",
        "labelled",
        "latency_sum_s",
        "started",
    )

    def __init__(self, *, buckets: Sequence[float], started: float) -> None:
        self._buckets = tuple(buckets)
        self.started = started
        self._counts = [0] * (len(self._buckets) + 1)
        self._errors: Counter[str] = Counter()
        self.inferences = 0
        self.latency_sum_s = 0.0
        self.labelled = 0
        self.correct = 0
        self.confidence_sum = 0.0

    @property
    def empty(self) -> bool:
        return self.inferences == 0 and not self._errors

    def record(self, *, latency_s: float, confidence: float, correct: bool | None = None) -> None:
        """One inference; `correct` is None when the sample had no label."""
        self._counts[bisect.bisect_left(self._buckets, latency_s)] += 1
        self.inferences += 1
        self.latency_sum_s += latency_s
        self.confidence_sum += confidence
        if correct is not None:
            self.labelled += 1
            self.correct += int(correct)

    def record_error(self, kind: str) -> None:
        self._errors[kind] += 1

    @property
    def error_count(self) -> int:
        return sum(self._errors.values())

    def close(self, *, ended: float) -> WindowSnapshot:
        return WindowSnapshot(
            started=self.started,
            ended=ended,
            inferences=self.inferences,
            bucket_counts=tuple(self._counts),
            latency_sum_s=self.latency_sum_s,
            labelled=self.labelled,
            correct=self.correct,
            confidence_sum=self.confidence_sum,
            errors=dict(self._errors),
        )
