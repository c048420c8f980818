"""The demo's models: train the digits example once, then compress it for each device class (planner or recipe).

torch is imported inside the functions only (the controller never loads it at import time). With the planner,
each class gets a search with a small time budget; a class for which nothing fits in that budget falls back to
its fixed recipe below, chosen to fit the shipped profiles (cortex-a53: a 48 KiB partition, so a quarter-width
student in int8; rpi4: a 1.5 ms budget at speed factor 6 with no int8 dot-product, so a quarter-width fp32 student).

Example::

    trained = train_digits(epochs=4)
    built = compress_for_class(trained, profile, mode="recipe")
    built.onnx, built.recipe_label, built.metrics
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import JsonValue

from edgefleet.controller.errors import ControllerError
from edgefleet.protocols.profile import DeviceProfile

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BuiltModel",
    "CompressMode",
    "TrainedModel",
    "compress_for_class",
    "fixed_recipe",
    "train_digits",
    "validation_arrays",
    "write_validation_set",
]

log = logging.getLogger(__name__)

Status = Callable[[str], None]

_QUARTER_STUDENT: dict[str, Any] = {"kind": "distill", "width": 0.25, "epochs": 6, "time_budget_s": 40}
# Recipes as data, per class; a class not named here gets the rpi4 one (fp32, small and fast).
FIXED_RECIPES: dict[str, dict[str, Any]] = {
    "cortex-a53": {
        "name": "demo-cortex-a53",
        "passes": [_QUARTER_STUDENT, {"kind": "quantize_static", "max_accuracy_drop": 0.03}],
    },
    "rpi4": {"name": "demo-rpi4", "passes": [_QUARTER_STUDENT]},
}


class CompressMode(StrEnum):
    planner = "planner"  # the planner with a time budget; the fixed recipe where nothing fits in time
    recipe = "recipe"  # the fixed recipe of the class


class DemoModelError(ControllerError):
    """Training or compressing the demo model failed."""


@dataclass(frozen=True, slots=True)
class TrainedModel:
    module: Any  # torch.nn.Module, kept untyped so that this module imports without torch
    task: Any  # edgefleet.compression.task.Task
    accuracy: float


@dataclass(frozen=True, slots=True)
class BuiltModel:
    class_name: str
    onnx: bytes
    recipe_label: str
    source: str  # "planner" or "recipe"
    recipe: tuple[dict[str, JsonValue], ...]
    metrics: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def fixed_recipe(class_name: str) -> dict[str, Any]:
    return FIXED_RECIPES.get(class_name, {**FIXED_RECIPES["rpi4"], "name": f"demo-{class_name}"})


def train_digits(*, epochs: int, torch_threads: int = 1) -> TrainedModel:
    """Train the digits example (a few epochs are enough for ~99% on its validation split)."""
    import torch

    from edgefleet.compression import CompressionError
    from edgefleet.compression.examples import train_example

    torch.set_num_threads(torch_threads)
    try:
        module, task = train_example("digits", epochs=epochs)
    except CompressionError as exc:
        raise DemoModelError(f"training the digits example failed: {exc}") from exc
    with torch.no_grad():
        logits = module(torch.from_numpy(task.x_val))
    accuracy = float((logits.argmax(dim=1).numpy() == task.y_val).mean())
    return TrainedModel(module=module, task=task, accuracy=accuracy)


def validation_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits held-out inputs and labels: what the devices replay (labelled, so accuracy is measured)."""
    from edgefleet.compression.examples.digits import digits_task

    task = digits_task()
    return task.x_val, task.y_val


def write_validation_set(path: Path) -> Path:
    """The validation split as the `.npz` (`x`, `y`) that `edgefleet-agent simulate --dataset` replays."""
    import numpy as np

    x, y = validation_arrays()
    np.savez(path, x=x, y=y)
    return path


def _recipe_dicts(recipe: Any) -> tuple[dict[str, JsonValue], ...]:
    return tuple(p.model_dump(mode="json") for p in recipe.passes)


def _with_recipe(trained: TrainedModel, profile: DeviceProfile, *, note: str | None = None) -> BuiltModel:
    from edgefleet.compression import CompressionError, compress, parse_recipe

    recipe = parse_recipe(fixed_recipe(profile.name), source=f"the demo recipe of {profile.name}")
    try:
        onnx, report = compress(trained.module, recipe, trained.task, threads=1, latency_runs=100, rss=False)
    except CompressionError as exc:
        raise DemoModelError(f"compressing digits for {profile.name} failed: {exc}") from exc
    res = report.result
    return BuiltModel(
        class_name=profile.name,
        onnx=onnx,
        recipe_label=" > ".join(p.kind.value for p in recipe.passes),
        source="recipe",
        recipe=_recipe_dicts(recipe),
        metrics={
            "accuracy": res.accuracy,
            "latency_p95_ms_host": res.latency_p95_ms,
            "file_bytes": float(res.file_bytes),
        },
        notes=(note,) if note else (),
    )


def _with_planner(trained: TrainedModel, profile: DeviceProfile, *, time_budget_s: float) -> BuiltModel | str:
    """The planner's choice, or why there is none (then the caller uses the fixed recipe)."""
    from edgefleet.compression import CompressionError
    from edgefleet.compression.planner import PlanOptions, plan

    # One short rung, few chains, no RSS subprocess: a quick search; each fine-tune is capped so that the pass
    # running when the budget ends does not overrun it by much.
    options = PlanOptions(
        time_budget_s=time_budget_s,
        rss=False,
        rung_epochs=(3,),
        max_chains=3,
        latency_runs=50,
        latency_repeats=1,
        finetune_time_budget_s=max(5.0, time_budget_s / 3),
    )
    try:
        result = plan(trained.module, trained.task, profile, options=options)
    except CompressionError as exc:
        return f"the planner failed ({exc})"
    chosen = result.chosen
    if not result.feasible or chosen is None or result.artifact is None:
        closest = result.closest.label if result.closest is not None else "none"
        return f"nothing fit within {time_budget_s:g}s of planning (closest: {closest})"
    m = chosen.measurement
    return BuiltModel(
        class_name=profile.name,
        onnx=result.artifact,
        recipe_label=chosen.label,
        source="planner",
        recipe=_recipe_dicts(chosen.recipe),
        metrics={
            "accuracy": m.accuracy,
            "latency_p95_ms_host": m.latency_p95_ms,
            "predicted_latency_ms": chosen.predicted_latency_ms,
            "file_bytes": float(m.file_bytes),
        },
        notes=(f"binding constraint: {result.binding.value}",) if result.binding is not None else (),
    )


def compress_for_class(
    trained: TrainedModel, profile: DeviceProfile, *, mode: CompressMode, plan_budget_s: float = 40.0
) -> BuiltModel:
    """One compressed model for `profile`'s class; the fixed recipe when the planner finds nothing in time."""
    if mode is CompressMode.planner:
        planned = _with_planner(trained, profile, time_budget_s=plan_budget_s)
        if isinstance(planned, BuiltModel):
            return planned
        log.info("class %s: %s; using its fixed recipe", profile.name, planned)
        return _with_recipe(trained, profile, note=f"planner: {planned}; fixed recipe used")
    return _with_recipe(trained, profile)
