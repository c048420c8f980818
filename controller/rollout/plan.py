"""What a rollout is made of: its wave plan, its gate thresholds, its selector, and the states it moves through.

These are data (pydantic), stored as JSON in the `rollouts` row, validated when built so the engine can trust them.

Example::

    plan = WavePlan(canary="5%", growth=2.0, max_concurrent=10, device_timeout_s=600)
    plan.sizes(30)   # -> [2, 4, 8, 16]
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BREACH_ACTIONS",
    "GATE_NAMES",
    "LATE_WAVE",
    "GateConfig",
    "Selector",
    "WavePlan",
    "parse_canary",
]

_CANARY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")
BREACH_ACTIONS = ("pause", "abort")
LATE_WAVE = -1  # the wave of devices that got a completed rollout's model after it ended (catch-up)
GATE_NAMES = ("accuracy", "latency_p95", "error_rate", "job_failure_rate")


def parse_canary(text: str) -> tuple[float, bool]:
    """`"5%"` -> (5.0, True); `"3"` -> (3.0, False). Raises ValueError with a message for the operator."""
    match = _CANARY_RE.match(text)
    if match is None:
        raise ValueError(f"canary {text!r} is not a device count (3) or a percentage (5%)")
    value, percent = float(match.group(1)), bool(match.group(2))
    if percent and not 0 < value <= 100:
        raise ValueError(f"canary {text!r}: a percentage must be above 0 and at most 100")
    if not percent and (value < 1 or value != int(value)):
        raise ValueError(f"canary {text!r}: a device count must be a whole number of at least 1")
    return value, percent


class WavePlan(BaseModel):
    """A canary (N devices or P% of the target), then waves growing by `growth`, the last taking the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    canary: str = "5%"
    growth: Annotated[float, Field(ge=1.0, le=100.0)] = 2.0
    max_concurrent: Annotated[int, Field(ge=1, le=100_000)] = 50
    device_timeout_s: Annotated[float, Field(gt=0, le=7 * 86400)] = 900.0

    @field_validator("canary")
    @classmethod
    def _canary(cls, value: str) -> str:
        parse_canary(value)
        return value.strip()

    def canary_size(self, total: int) -> int:
        value, percent = parse_canary(self.canary)
        size = math.ceil(total * value / 100) if percent else int(value)
        return max(1, min(total, size)) if total else 0

    def sizes(self, total: int) -> list[int]:
        """Planned wave sizes for `total` devices: e.g. 30 devices, canary 5%, growth 2 -> [2, 4, 8, 16]."""
        if total <= 0:
            return []
        sizes = [self.canary_size(total)]
        left = total - sizes[0]
        while left > 0:
            nxt = max(sizes[-1] + 1, math.ceil(sizes[-1] * self.growth)) if self.growth > 1 else sizes[-1]
            nxt = min(nxt, left)
            if left - nxt < nxt * 0.25:  # a tiny tail joins the last wave instead of making its own
                nxt = left
            sizes.append(nxt)
            left -= nxt
        return sizes


class GateConfig(BaseModel):
    """Gate thresholds and how much evidence a gate needs before it judges.

    Thresholds left None come from the class: the latency budget from its profile, the accuracy floor from the
    profile's `accuracy_floor`, or else the previous model's field accuracy (or the artifact's measured accuracy)
    minus the profile's `max_accuracy_drop`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: Annotated[float, Field(gt=0, le=7 * 86400)] = 300.0
    min_devices: Annotated[int, Field(ge=1, le=100_000)] = 3
    min_samples: Annotated[int, Field(ge=1)] = 100
    min_labelled: Annotated[int, Field(ge=1)] = 50
    accuracy_floor: Annotated[float | None, Field(ge=0, le=1)] = None
    latency_p95_ms: Annotated[float | None, Field(gt=0)] = None
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.02
    max_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.2
    data_wait_s: Annotated[float, Field(gt=0, le=7 * 86400)] = 1800.0
    waived: tuple[str, ...] = ()

    @field_validator("waived")
    @classmethod
    def _known_gates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(GATE_NAMES))
        if unknown:
            raise ValueError(f"unknown gate(s) {', '.join(unknown)}; gates are {', '.join(GATE_NAMES)}")
        return tuple(sorted(set(value)))


class Selector(BaseModel):
    """Narrows the class: only these device ids, and/or ids starting with a prefix, and/or one fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_ids: tuple[str, ...] = ()
    id_prefix: str | None = None
    fleet: str | None = None

    def matches(self, device_id: str, fleet: str) -> bool:
        if self.device_ids and device_id not in self.device_ids:
            return False
        if self.id_prefix is not None and not device_id.startswith(self.id_prefix):
            return False
        return self.fleet is None or fleet == self.fleet
