"""Telemetry batches: per-window inference counts, latency histogram counts, accuracy on labelled samples, errors.

Latency travels as counts in the fixed buckets `LATENCY_BUCKETS_SECONDS`, the same upper bounds as the
controller's Prometheus histogram, so the controller adds batches up exactly (percentiles cannot be added).
`latency_counts[i]` counts the inferences with `bounds[i-1] < latency <= bounds[i]` (not cumulative);
the last entry counts those above the largest bound (+Inf). Use `bucket_index(seconds)` to place one.
"""

from __future__ import annotations

from bisect import bisect_left
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Self

from pydantic import Field, model_validator

from edgefleet.protocols.wire import Digest, Identifier, Message, UtcDatetime

__all__ = ["LATENCY_BUCKETS_SECONDS", "MAX_WINDOW", "ErrorKind", "TelemetryBatch", "bucket_index"]

LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.0001, 0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
MAX_WINDOW = timedelta(days=1)
_MAX_COUNT = 10**12


def bucket_index(seconds: float) -> int:
    """The index in `latency_counts` for one latency (len(LATENCY_BUCKETS_SECONDS) means above the last bound)."""
    return bisect_left(LATENCY_BUCKETS_SECONDS, seconds)


class ErrorKind(StrEnum):
    """Bounded set of error kinds a device counts (keys of `TelemetryBatch.errors`)."""

    INFERENCE = "inference"
    INPUT = "input"
    MODEL_LOAD = "model_load"
    OUT_OF_MEMORY = "out_of_memory"
    TIMEOUT = "timeout"
    TRANSPORT = "transport"
    OTHER = "other"


_Count = Annotated[int, Field(ge=0, le=_MAX_COUNT)]


class TelemetryBatch(Message):
    """One telemetry window from one device (the device id is in the topic).

    `session` is chosen at random when the agent starts and `seq` counts batches within it from 0, so the
    controller drops a duplicate by remembering the last `(session, seq)` per device.
    """

    session: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")]
    seq: Annotated[int, Field(ge=0, le=2**63 - 1)]
    window_start: UtcDatetime
    window_end: UtcDatetime
    model_name: Identifier | None = None
    model_digest: Digest | None = None
    model_version: Annotated[int | None, Field(ge=1, le=2**31 - 1)] = None
    inference_count: _Count = 0
    latency_counts: Annotated[
        tuple[_Count, ...],
        Field(
            min_length=len(LATENCY_BUCKETS_SECONDS) + 1,
            max_length=len(LATENCY_BUCKETS_SECONDS) + 1,
            description="non-cumulative counts per LATENCY_BUCKETS_SECONDS bucket, last one +Inf",
        ),
    ] = (0,) * (len(LATENCY_BUCKETS_SECONDS) + 1)
    latency_sum_seconds: Annotated[float, Field(ge=0.0, le=1e12)] = 0.0
    labelled_count: _Count = 0
    correct_count: _Count = 0
    mean_top1_confidence: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    errors: Annotated[dict[ErrorKind, _Count], Field(max_length=len(ErrorKind))] = Field(default_factory=dict)
    rss_bytes: Annotated[int | None, Field(ge=0, le=2**50)] = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.window_end < self.window_start:
            raise ValueError("window_end: is before window_start")
        if self.window_end - self.window_start > MAX_WINDOW:
            raise ValueError(f"window_end: window is longer than {MAX_WINDOW}")
        if sum(self.latency_counts) != self.inference_count:
            raise ValueError("latency_counts: must add up to inference_count")
        if self.correct_count > self.labelled_count:
            raise ValueError("correct_count: is larger than labelled_count")
        return self
