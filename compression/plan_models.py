"""The planner's data: options, constraint checks, measured candidates and the plan result (pydantic, JSON-ready).

These are the types `edgefleet compress plan --json` prints; the artifact bytes travel on `PlanResult.artifact` but
are left out of the JSON.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.compression.measure import Measurement
from edgefleet.compression.recipe import (
    ActivationPruneConfig,
    DistillConfig,
    FactorizeConfig,
    MagnitudePruneConfig,
    PassKind,
    Recipe,
    StructuredPruneConfig,
)
from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes

__all__ = [
    "Candidate",
    "Constraint",
    "ConstraintAnalysis",
    "ConstraintCheck",
    "PassContribution",
    "PlanOptions",
    "PlanResult",
    "describe_recipe",
]


def describe_recipe(recipe: Recipe) -> str:
    """'distill(w=0.5) > prune_structured(0.3) > quantize_static', or 'fp32' for the empty recipe."""
    parts = []
    for config in recipe.passes:
        strength = ""
        if isinstance(config, DistillConfig):
            strength = f"(w={config.width:g})"
        elif isinstance(config, StructuredPruneConfig | ActivationPruneConfig | MagnitudePruneConfig):
            strength = f"({config.amount:g})"
        elif isinstance(config, FactorizeConfig) and config.energy is not None:
            strength = f"(e={config.energy:g})"
        parts.append(f"{config.kind.value}{strength}")
    return " > ".join(parts) or "fp32"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Constraint(StrEnum):
    """What a device class limits: file bytes, peak RSS, p95 latency on the device, accuracy."""

    STORAGE = "storage"
    RAM = "ram"
    LATENCY = "latency"
    ACCURACY = "accuracy"


class PlanOptions(_Frozen):
    """How hard the planner searches and how it judges; the defaults plan the digits example in minutes on 2 cores."""

    time_budget_s: Annotated[float | None, Field(gt=0, description="stop and return the best fit found so far")] = None
    rung_epochs: Annotated[
        tuple[int, ...], Field(min_length=1, max_length=5, description="fine-tune epochs per successive-halving rung")
    ] = (1, 3)
    eta: Annotated[int, Field(ge=2, le=10, description="keep 1/eta of the recipes at each rung")] = 3
    distill_epoch_factor: Annotated[int, Field(ge=1, le=10, description="distillation epochs per rung epoch")] = 2
    finetune_time_budget_s: Annotated[float, Field(gt=0, le=3600, description="cap on one pass's training")] = 90.0
    confidence: Annotated[
        float, Field(ge=0.5, lt=1.0, description="one-sided confidence for the accuracy floor (0.5: point estimate)")
    ] = 0.95
    host_threads: Annotated[
        int, Field(ge=1, le=256, description="onnxruntime threads for host latency and the host reference times")
    ] = 1
    latency_runs: Annotated[int, Field(ge=10, le=100_000)] = 200
    latency_repeats: Annotated[int, Field(ge=1, le=9, description="lowest of this many p95 measurements")] = 3
    rss: bool = Field(default=True, description="measure peak RSS in a fresh process (needed for the RAM budget)")
    host_reference: ReferenceTimes | None = Field(
        default=None,
        description="this host's reference-workload times at `host_threads` (None: measured once per host and "
        "cached, compression/host_speed.py)",
    )
    max_chains: Annotated[int, Field(ge=1, le=32, description="structural recipes tried at the first rung")] = 8
    accuracy_tie: Annotated[
        float,
        Field(
            ge=0.0,
            le=0.05,
            description="fits whose validation accuracy is within this of the best fit's count as equally accurate; "
            "the smallest of them (then the fastest) is chosen",
        ),
    ] = 0.005
    seed: int = 0


class ConstraintCheck(_Frozen):
    """One constraint judged on one candidate. `slack` > 0 is headroom, < 0 is how far the budget is missed.

    For storage, RAM and latency `slack` is relative ((budget - value) / budget); for accuracy it is in accuracy
    points (the conservative accuracy bound minus the required accuracy).
    """

    constraint: Constraint
    value: float
    budget: float
    unit: str
    fits: bool
    slack: float
    detail: str = ""

    @property
    def miss(self) -> float:
        """How much the budget is missed: a fraction of it (storage, RAM, latency) or accuracy points; 0 if it fits."""
        return max(0.0, -self.slack)


class Candidate(_Frozen):
    """A recipe the planner built and measured, judged against the profile."""

    key: str = Field(description="content hash of (model, data, recipe, fidelity): the cache key")
    parent: str | None
    recipe: Recipe
    rung: int
    measurement: Measurement
    predicted_latency_ms: float
    checks: list[ConstraintCheck] = Field(default_factory=list)
    incompatible: list[str] = Field(default_factory=list)
    fits: bool = False
    seconds: float = 0.0
    cached: bool = False
    notes: list[str] = Field(default_factory=list)

    def check(self, constraint: Constraint) -> ConstraintCheck:
        for item in self.checks:
            if item.constraint == constraint:
                return item
        raise KeyError(constraint)

    @property
    def label(self) -> str:
        """A short name for tables: the passes and their strengths, or 'fp32'."""
        return describe_recipe(self.recipe)


class ConstraintAnalysis(_Frozen):
    """What the fp32 model violates on this profile, how much reduction each constraint needs, and which passes help."""

    fp32_checks: list[ConstraintCheck]
    violated: list[Constraint]
    needs: dict[Constraint, float] = Field(description="reduction factor needed (value / budget) for violated ones")
    remedies: dict[Constraint, list[PassKind]]
    export_opset: int
    incompatible: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class PassContribution(_Frozen):
    """What one pass of the chosen recipe did: the measured state before and after it."""

    kind: PassKind
    bytes_before: int
    bytes_after: int
    latency_before_ms: float
    latency_after_ms: float
    accuracy_before: float
    accuracy_after: float
    rss_before: int | None = None
    rss_after: int | None = None


class PlanResult(_Frozen):
    """The plan for one model on one device profile; `feasible` False means nothing fit (see `closest`)."""

    profile: DeviceProfile
    task: str
    feasible: bool
    chosen: Candidate | None = None
    closest: Candidate | None = Field(default=None, description="when nothing fits: the candidate that misses least")
    misses: list[ConstraintCheck] = Field(default_factory=list, description="the closest candidate's missed checks")
    binding: Constraint | None = Field(default=None, description="the constraint that rejected more accurate recipes")
    fp32: Candidate | None = None
    analysis: ConstraintAnalysis | None = None
    front: list[Candidate] = Field(default_factory=list)
    candidates: list[Candidate] = Field(default_factory=list)
    contributions: list[PassContribution] = Field(default_factory=list)
    incompatible: list[str] = Field(default_factory=list)
    timed_out: bool = False
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    notes: list[str] = Field(default_factory=list)
    artifact: bytes | None = Field(default=None, exclude=True, repr=False, description="the chosen ONNX model")
