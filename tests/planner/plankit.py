"""Helpers of the planner tests: a roomy test profile, fast planner options, the tiny model holder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edgefleet.compression import Task
from edgefleet.compression.planner import PlanOptions
from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes

# A host whose reference times are all 1 ms: against the test profile (all 2 ms) a device runs 2x the host.
HOST = ReferenceTimes(fp32_conv=1.0, fp32_matmul=1.0, int8_conv=1.0, int8_matmul=1.0)
FAST = PlanOptions(
    rung_epochs=(1,), latency_runs=20, latency_repeats=1, rss=False, max_chains=2, eta=2, host_reference=HOST
)


@dataclass(frozen=True)
class Tiny:
    model: nn.Module
    task: Task
    onnx: bytes


def make_profile(**changes: object) -> DeviceProfile:
    """A roomy profile (nothing binds for the tiny model) with `changes` applied."""
    base: dict[str, object] = {
        "name": "test-class",
        "storage_budget_bytes": 10_000_000,
        "ram_budget_bytes": 1_000_000_000,
        "latency_budget_ms": 50.0,
        "threads": 1,
        "int8_dot_product": True,
        "reference_ms": {"fp32_conv": 2.0, "fp32_matmul": 2.0, "int8_conv": 2.0, "int8_matmul": 2.0},
        "max_accuracy_drop": 0.05,
    }
    return DeviceProfile.model_validate({**base, **changes})
