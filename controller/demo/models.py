"""The demo's models: train the digits example once, then compress it for each device class (planner or recipe).

torch is imported inside the functions only (the controller never loads it at import time). With the planner,
each class gets a search with a small time budget; a class for which nothing fits in that budget falls back to
its fixed recipe below, chosen to fit the shipped profiles (cortex-a53: a 48 KiB partition, so a quarter-width
student in int8; rpi4: a 2 ms budget on a device ~2.4x slower than a server core with no int8 dot-product, so a
quarter-width fp32 student,
which also fits when the devices run 2.5x slower).

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
from edgefleet.protocols.profile import DeviceProfile, ReferenceTimes

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "LADDER",
    "SWAPPED_LABELS",
    "BuiltModel",
    "CompressMode",
    "TrainedModel",
    "compress_for_class",
    "fixed_recipe",
    "host_p95_ms",
    "onnx_accuracy",
    "recipe_width",
    "swap_labels",
    "train_digits",
    "validation_arrays",
    "width_latency_ms",
    "write_validation_set",
]

log = logging.getLogger(__name__)

Status = Callable[[str], None]

_QUARTER_STUDENT: dict[str, Any] = {"kind": "distill", "width": 0.25, "epochs": 6, "time_budget_s": 40}
_HALF_STUDENT: dict[str, Any] = {"kind": "distill", "width": 0.5, "epochs": 4, "time_budget_s": 40}
_FULL_STUDENT: dict[str, Any] = {"kind": "distill", "width": 1.0, "epochs": 2, "time_budget_s": 40}
# Recipes as data, per class; a class not named here gets the rpi4 one (fp32, small and fast).
FIXED_RECIPES: dict[str, dict[str, Any]] = {
    "cortex-a53": {
        "name": "demo-cortex-a53",
        "passes": [_QUARTER_STUDENT, {"kind": "quantize_static", "max_accuracy_drop": 0.03}],
    },
    "rpi4": {"name": "demo-rpi4", "passes": [_QUARTER_STUDENT]},
    "x86-gateway": {"name": "demo-x86-gateway", "passes": [_HALF_STUDENT]},
}
# The recompression ladder, most accurate (and slowest) first: the demo's slow class starts on the first rung (it
# fits the budget at the profiled speed, not 2-3x slower) and a recompression takes the first rung predicted to fit
# the speed measured in the field.
# `width` is the student's share of the teacher's channels (its compute grows with it).
LADDER: tuple[dict[str, Any], ...] = (
    {"name": "demo-full-width", "passes": [_FULL_STUDENT]},
    {"name": "demo-half-width", "passes": [_HALF_STUDENT]},
    {"name": "demo-quarter-width", "passes": [_QUARTER_STUDENT]},
)


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


def recipe_width(recipe: dict[str, Any]) -> float:
    """The student width of a recipe (1.0, the teacher's, when it has no distill pass)."""
    return next((float(p.get("width", 0.5)) for p in recipe["passes"] if p.get("kind") == "distill"), 1.0)


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


def _pass_label(p: Any) -> str:
    width = getattr(p, "width", None)
    return f"{p.kind.value} w{width:g}" if width is not None else str(p.kind.value)


def _recipe_dicts(recipe: Any) -> tuple[dict[str, JsonValue], ...]:
    return tuple(p.model_dump(mode="json") for p in recipe.passes)


def _with_recipe(
    trained: TrainedModel, profile: DeviceProfile, *, note: str | None = None, recipe_data: dict[str, Any] | None = None
) -> BuiltModel:
    from edgefleet.compression import CompressionError, compress, parse_recipe

    data = recipe_data if recipe_data is not None else fixed_recipe(profile.name)
    recipe = parse_recipe(data, source=f"the demo recipe {data.get('name')} of {profile.name}")
    try:
        onnx, report = compress(trained.module, recipe, trained.task, threads=1, latency_runs=100, rss=False)
    except CompressionError as exc:
        raise DemoModelError(f"compressing digits for {profile.name} failed: {exc}") from exc
    res = report.result
    return BuiltModel(
        class_name=profile.name,
        onnx=onnx,
        recipe_label=" > ".join(_pass_label(p) for p in recipe.passes),
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
    trained: TrainedModel,
    profile: DeviceProfile,
    *,
    mode: CompressMode,
    plan_budget_s: float = 40.0,
    recipe: dict[str, Any] | None = None,
) -> BuiltModel:
    """One compressed model for `profile`'s class; the fixed recipe when the planner finds nothing in time.

    `recipe` (data, e.g. a `LADDER` rung) is used as given, whatever the mode.
    """
    if recipe is not None:
        return _with_recipe(trained, profile, recipe_data=recipe)
    if mode is CompressMode.planner:
        planned = _with_planner(trained, profile, time_budget_s=plan_budget_s)
        if isinstance(planned, BuiltModel):
            return planned
        log.info("class %s: %s; using its fixed recipe", profile.name, planned)
        return _with_recipe(trained, profile, note=f"planner: {planned}; fixed recipe used")
    return _with_recipe(trained, profile)


# ---------------------------------------------------------------------------------------------------- the bad artifact
SWAPPED_LABELS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5))


def swap_labels(onnx: bytes, pairs: tuple[tuple[int, int], ...] = SWAPPED_LABELS) -> bytes:
    """The same model with the output rows of each pair of classes swapped: what a training run on data whose label
    map had those pairs crossed produces. It runs as fast as the original and agrees with itself (so it passes a
    device's validation when its samples are computed from it), but it calls a 0 a 1: its accuracy collapses.

    Works on a model whose logits come from a Gemm with constant weights and bias (the demo's fp32 students).
    """
    import numpy as np
    import onnx as onnx_lib
    from onnx import numpy_helper

    model = onnx_lib.load_from_string(onnx)
    graph = model.graph
    output = graph.output[0].name
    node = next((n for n in graph.node if output in n.output), None)
    if node is None or node.op_type != "Gemm" or len(node.input) < 3:
        raise DemoModelError(f"cannot plant swapped labels: the output {output!r} does not come from a Gemm with bias")
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    initializers = {i.name: i for i in graph.initializer}
    weight, bias = initializers.get(node.input[1]), initializers.get(node.input[2])
    if weight is None or bias is None:
        raise DemoModelError("cannot plant swapped labels: the output Gemm's weights are not constants")
    order = list(range(int(numpy_helper.to_array(bias).shape[0])))
    for a, b in pairs:
        order[a], order[b] = order[b], order[a]
    w = numpy_helper.to_array(weight)
    w = w[order, :] if trans_b else w[:, order]
    bias_array = numpy_helper.to_array(bias)[order]
    weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), weight.name))
    bias.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(bias_array), bias.name))
    return bytes(model.SerializeToString())


def _session(onnx: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_accuracy(onnx: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier on (x, y), one sample at a time (as the devices run it)."""
    import numpy as np

    session = _session(onnx)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(axis=1) == y).mean())


def host_p95_ms(onnx: bytes, *, runs: int = 200, quantile: float = 95) -> float:
    """p95 (or another percentile) of one inference on this host at one thread, in this thread's CPU time (what a
    simulated device's latency is scaled from, compression/measure.py)."""
    import time

    import numpy as np

    session = _session(onnx)
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    sample = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(10):
        session.run(None, {inp.name: sample})
    times = []
    for _ in range(runs):
        began = time.thread_time()
        session.run(None, {inp.name: sample})
        times.append(time.thread_time() - began)
    return float(np.percentile(times, quantile) * 1000)


def host_times() -> ReferenceTimes:
    """This host's reference-workload times at one thread (measured once per host, compression/host_speed.py)."""
    from edgefleet.compression.host_speed import host_reference

    return host_reference()


def width_latency_ms(width: float) -> float:
    """Host median latency of an (untrained) digits network of `width`: compute does not depend on the weights, so
    the recompression can rank the ladder's rungs before training any of them (the median: the host is busy)."""
    import numpy as np
    import torch

    from edgefleet.compression.examples.digits import DigitsNet
    from edgefleet.compression.export import export_onnx

    torch.manual_seed(0)
    module = DigitsNet(width=width).eval()
    return host_p95_ms(export_onnx(module, np.zeros((1, 1, 16, 16), dtype=np.float32)), quantile=50)
