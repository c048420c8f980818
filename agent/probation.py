"""The probation watch after a new model is switched on: an error burst or a latency breach ends it badly.

Latency is judged per batch of `LATENCY_SAMPLE` inferences; a breach is two batches in a row over the budget, so one
burst of interference from other work on the device does not roll a good model back (a slow model is slow in every
batch).
"""

from __future__ import annotations

__all__ = ["Probation"]

LATENCY_SAMPLE = 50
BREACHES_IN_A_ROW = 2


class Probation:
    """Counts errors and collects latencies; `observe` returns why the new model must go, or None."""

    __slots__ = ("breaches", "budget_s", "errors", "latencies", "max_errors")

    def __init__(self, *, max_errors: int, budget_s: float | None) -> None:
        self.max_errors = max_errors
        self.budget_s = budget_s
        self.errors = 0
        self.latencies: list[float] = []
        self.breaches = 0  # batches over the budget in a row

    def observe(self, *, latency_s: float, error: bool) -> str | None:
        if error:
            self.errors += 1
            if self.errors >= self.max_errors:
                return f"{self.errors} inference errors during probation"
            return None
        self.latencies.append(latency_s)
        if len(self.latencies) < LATENCY_SAMPLE:
            return None
        ordered = sorted(self.latencies)
        self.latencies = []
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        if not self.budget_s or p95 <= self.budget_s:
            self.breaches = 0
            return None
        self.breaches += 1
        if self.breaches < BREACHES_IN_A_ROW:
            return None
        return (
            f"p95 latency {p95 * 1000:.2f} ms over the budget of {self.budget_s * 1000:.2f} ms during probation "
            f"({self.breaches} batches of {LATENCY_SAMPLE} in a row)"
        )
