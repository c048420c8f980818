"""Run a recipe: export and verify after every pass, measure the fp32 baseline and the result, report it all.

    onnx_bytes, report = compress(model, recipe, task)

`apply_steps` is the step-by-step form: it yields the state after each pass, so a caller (the planner) can keep
intermediate models and run only the suffix of a recipe that shares a prefix with one it has already run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgefleet.compression.errors import DataError, VerificationError
from edgefleet.compression.export import (
    OPSET,
    check_onnx,
    compact_names,
    export_onnx,
    first_nonfinite_node,
    onnx_parameter_counts,
    run_onnx,
    verify_against_torch,
)
from edgefleet.compression.measure import Measurement, measure
from edgefleet.compression.recipe import FINAL_PASSES, PassConfig, PassKind, Recipe
from edgefleet.compression.registry import ModelState, PassContext, PassFactory, make_pass
from edgefleet.compression.task import Task

__all__ = ["CompressionReport", "StepReport", "apply_steps", "compress", "initial_state"]

log = logging.getLogger(__name__)
RECIPE_METADATA_KEY = "edgefleet.recipe"
VERIFY_SAMPLES = 64
MIN_QUANT_AGREEMENT = 0.8


class StepReport(BaseModel):
    """One pass: what it did and what the verified ONNX export looked like afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    kind: PassKind
    seconds: float
    parameters: int
    onnx_bytes: int
    accuracy: float
    max_abs_diff: float | None = None
    prediction_agreement: float | None = None
    notes: list[str] = Field(default_factory=list)


class CompressionReport(BaseModel):
    """The whole job: the recipe, the fp32 baseline, the result (ratios against the baseline) and every step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: Recipe
    task: str
    source: Literal["torch", "onnx"]
    opset: int
    baseline: Measurement
    result: Measurement
    steps: list[StepReport]
    notes: list[str]
    versions: dict[str, str]
    seconds: float


def _check_model_io(model: nn.Module, task: Task) -> None:
    try:
        with torch.no_grad():
            out = model.eval()(torch.from_numpy(task.x_train[:2]))
    except Exception as exc:
        raise DataError(
            f"the model rejects inputs of shape {(2, *task.input_shape)}: {exc} (the data's sample shape must match "
            "the model's input; a torch.export program must accept any batch size: export it with a dynamic batch)"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, task.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model returns {shape} for 2 samples; expected logits of shape (2, {task.num_classes})")


def initial_state(model: nn.Module | bytes, task: Task, *, opset: int = OPSET) -> ModelState:
    """Check that model and data fit together and export (or check) the fp32 ONNX model."""
    if isinstance(model, bytes):
        graph = check_onnx(model).graph
        inits = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        dims = tuple(d.dim_value for d in inputs[0].type.tensor_type.shape.dim[1:]) if inputs else ()
        if all(dims):
            task.check_input(dims, source="the ONNX model")
        got = run_onnx(model, task.x_val[:2])
        if got.shape != (2, task.num_classes):
            raise DataError(f"the ONNX model returns {got.shape} for 2 samples; expected (2, {task.num_classes})")
        return ModelState(module=None, onnx=model)
    _check_model_io(model, task)
    data = export_onnx(model, task.x_val, opset=opset)
    verify_against_torch(data, model, task.x_val[:VERIFY_SAMPLES], step="fp32 export")
    return ModelState(module=model.eval(), onnx=data)


def _verify_final(before: bytes, after: bytes, task: Task, config: PassConfig) -> tuple[float | None, float]:
    """Quantized models cannot match float outputs exactly: check finiteness and top-1 agreement instead."""
    check_onnx(after)
    x = task.x_val
    old, new = run_onnx(before, x), run_onnx(after, x)
    if not np.isfinite(new).all():
        node = first_nonfinite_node(after, x)
        raise VerificationError(f"{config.kind.value}: outputs NaN/inf, first at node {node!r}", layer=node)
    agreement = float(np.mean(old.argmax(1) == new.argmax(1)))
    if agreement < MIN_QUANT_AGREEMENT:
        raise VerificationError(
            f"{config.kind.value}: the quantized model agrees with the float model on only {agreement:.0%} of the "
            f"validation inputs (at least {MIN_QUANT_AGREEMENT:.0%} expected); try another calibration method or qat"
        )
    diff = float(np.max(np.abs(old - new))) if config.kind == PassKind.FP16 else None
    return diff, agreement


def apply_steps(
    state: ModelState,
    recipe: Recipe,
    task: Task,
    *,
    ctx: PassContext | None = None,
    registry: dict[PassKind, PassFactory] | None = None,
    opset: int = OPSET,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[tuple[StepReport, ModelState]]:
    """Apply the recipe's passes one by one, yielding (step report, verified state) after each.

    `state` is never changed; each yielded state is new. Pass `ctx.teacher` (the recipe's original input model) when
    resuming from a cached intermediate state, so recovery fine-tunes distil from the same teacher.
    """
    recipe.check_source(has_torch_model=state.module is not None)
    ctx = ctx or PassContext(teacher=state.module, clock=clock)
    for index, config in enumerate(recipe.passes):
        began = clock()
        log.info("pass %s/%s: %s", index + 1, len(recipe.passes), config.kind.value)
        output = make_pass(config, registry=registry).apply(state, task, ctx)
        diff: float | None
        agreement: float | None = None
        if config.kind in FINAL_PASSES:
            if output.onnx is None:
                raise VerificationError(f"{config.kind.value} returned no ONNX model")
            diff, agreement = _verify_final(state.onnx, output.onnx, task, config)
            # Quantized graphs carry long generated tensor names that can outweigh a small model's int8 weights.
            new = ModelState(module=None, onnx=compact_names(output.onnx))
        else:
            if output.module is None:
                raise VerificationError(f"{config.kind.value} returned no torch model")
            data = export_onnx(output.module, task.x_val, opset=opset)
            diff = verify_against_torch(data, output.module, task.x_val[:VERIFY_SAMPLES], step=config.kind.value)
            new = ModelState(module=output.module, onnx=data)
        predictions = run_onnx(new.onnx, task.x_val).argmax(axis=1)
        report = StepReport(
            index=index,
            kind=config.kind,
            seconds=clock() - began,
            parameters=onnx_parameter_counts(onnx.load_from_string(new.onnx))[0],
            onnx_bytes=len(new.onnx),
            accuracy=float(np.mean(predictions == task.y_val)),
            max_abs_diff=diff,
            prediction_agreement=agreement,
            notes=list(output.notes),
        )
        yield report, new
        state = new


def stamp_recipe(data: bytes, recipe: Recipe) -> bytes:
    """Store the recipe (JSON) in the ONNX model's metadata, so the artifact says how it was made."""
    model = onnx.load_from_string(data)
    kept = [p for p in model.metadata_props if p.key != RECIPE_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=RECIPE_METADATA_KEY, value=recipe.model_dump_json())
    stamped: bytes = model.SerializeToString()
    return stamped


def compress(
    model: nn.Module | bytes,
    recipe: Recipe,
    task: Task,
    *,
    threads: int = 1,
    latency_runs: int = 300,
    rss: bool = True,
    opset: int = OPSET,
    seed: int = 0,
    registry: dict[PassKind, PassFactory] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[bytes, CompressionReport]:
    """Compress `model` (a torch module, or ONNX bytes for the ONNX-level passes only) with `recipe` on `task`.

    Returns the final ONNX bytes (the recipe stored in its metadata, internal names shortened: `compact_names`, also
    applied to the fp32 baseline that the ratios compare against) and the report. Raises a `CompressionError`
    subclass naming the cause before any work if the recipe cannot apply to this model or the data does not fit.
    """
    began = clock()
    recipe.check_source(has_torch_model=not isinstance(model, bytes))
    torch.manual_seed(seed)
    state = initial_state(model, task, opset=opset)
    baseline = measure(compact_names(state.onnx), task, threads=threads, runs=latency_runs, rss=rss)
    steps: list[StepReport] = []
    ctx = PassContext(teacher=state.module, seed=seed, clock=clock)
    for step, new in apply_steps(state, recipe, task, ctx=ctx, registry=registry, opset=opset, clock=clock):
        steps.append(step)
        state = new
    final = stamp_recipe(compact_names(state.onnx), recipe)
    result = measure(final, task, threads=threads, runs=latency_runs, rss=rss, baseline=baseline)
    notes = []
    if isinstance(model, bytes):
        notes.append("ONNX-only model: only the ONNX-level passes (quantize_static, quantize_dynamic, fp16) apply")
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
    report = CompressionReport(
        recipe=recipe,
        task=task.name,
        source="onnx" if isinstance(model, bytes) else "torch",
        opset=opset,
        baseline=baseline,
        result=result,
        steps=steps,
        notes=notes,
        versions=versions,
        seconds=clock() - began,
    )
    return final, report
