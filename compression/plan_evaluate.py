"""Build and measure candidate recipes, sharing prefixes: every recipe is a path in a tree rooted at the fp32 model.

`Evaluator.evaluate(passes)` returns the measured artifact of the recipe `passes`. The model after each prefix is
kept in memory, so `distill > prune > int8` and `distill > prune > fp16` run distillation and pruning once; results
come from the on-disk cache when (model, data, recipe, measurement settings) were measured before. A cached node
has no torch model in memory: if a child of it is missing, its prefix is recomputed (the cached measurement stays
the one reported).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgefleet.compression.errors import CompressionError
from edgefleet.compression.export import compact_names, run_onnx
from edgefleet.compression.measure import Measurement, measure
from edgefleet.compression.pipeline import apply_steps, stamp_recipe
from edgefleet.compression.plan_cache import CachedResult, PlanCache, content_key, task_digest
from edgefleet.compression.plan_models import PlanOptions, describe_recipe
from edgefleet.compression.recipe import PassConfig, PassKind, Recipe
from edgefleet.compression.registry import ModelState, PassContext
from edgefleet.compression.task import Task

__all__ = ["INT8_PASSES", "Evaluated", "Evaluator", "OutOfTimeError", "Passes"]

log = logging.getLogger(__name__)
Passes = tuple[PassConfig, ...]
INT8_PASSES = frozenset({PassKind.QUANTIZE_STATIC, PassKind.QUANTIZE_DYNAMIC, PassKind.QAT})


class OutOfTimeError(Exception):
    """The plan's time budget ran out before the next pass could start."""


@dataclass(frozen=True)
class Evaluated:
    """One measured recipe (profile-independent)."""

    key: str
    parent: str | None
    passes: Passes
    rung: int
    artifact: bytes
    measurement: Measurement
    correct: npt.NDArray[np.bool_]
    notes: tuple[str, ...]
    seconds: float
    cached: bool

    @property
    def int8(self) -> bool:
        return bool(self.passes) and self.passes[-1].kind in INT8_PASSES


class Evaluator:
    """Runs and measures recipes for one model and task; see the module docstring."""

    def __init__(
        self,
        root: ModelState,
        task: Task,
        *,
        options: PlanOptions,
        opset: int,
        cache: PlanCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        deadline: float | None = None,
        on_result: Callable[[Evaluated], None] | None = None,
    ) -> None:
        self.root, self.task, self.options, self.opset = root, task, options, opset
        self.cache, self.clock, self.deadline, self.on_result = cache, clock, deadline, on_result
        self.ctx = PassContext(teacher=root.module, seed=options.seed, clock=clock)
        settings = f"{opset}/{options.host_threads}/{options.latency_runs}/{options.latency_repeats}/{options.rss}"
        self.base = content_key(root.onnx, task_digest(task), settings, str(options.seed))
        self.results: dict[str, Evaluated] = {}
        self.failures: dict[str, str] = {}
        self._states: dict[str, ModelState] = {}
        self._steps: dict[str, tuple[tuple[str, ...], float]] = {}

    def key(self, passes: Passes) -> str:
        return content_key(self.base, Recipe(passes=list(passes)).model_dump_json())

    def check_time(self) -> None:
        if self.deadline is not None and self.clock() >= self.deadline:
            raise OutOfTimeError

    def evaluate(self, passes: Passes, *, rung: int = 0) -> Evaluated | None:
        """The measured recipe, or None if a pass failed (the reason is in `failures`)."""
        key = self.key(passes)
        if key in self.results:
            return self.results[key]
        if key in self.failures:
            return None
        parent = self.key(passes[:-1]) if passes else None
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            result = Evaluated(
                key,
                parent,
                passes,
                rung,
                hit.artifact,
                hit.measurement,
                hit.correct,
                hit.notes,
                hit.seconds,
                cached=True,
            )
        else:
            try:
                state = self._state(passes)
            except OutOfTimeError:
                raise
            except CompressionError as exc:
                self.failures[key] = f"{describe_recipe(Recipe(passes=list(passes)))}: {exc}"
                log.info("candidate failed: %s", exc)
                return None
            except Exception as exc:  # one broken pass must not stop the search; logged in full
                self.failures[key] = f"{describe_recipe(Recipe(passes=list(passes)))}: {type(exc).__name__}: {exc}"
                log.warning("candidate crashed: %s", self.failures[key], exc_info=True)
                return None
            if passes:  # the fp32 reference is always measured, whatever the budget
                self.check_time()
            try:
                result = self._measure(key, parent, passes, rung, state)
            except CompressionError as exc:
                self.failures[key] = f"{describe_recipe(Recipe(passes=list(passes)))}: measuring failed: {exc}"
                log.info("candidate could not be measured: %s", exc)
                return None
        self.results[key] = result
        if self.on_result is not None:
            self.on_result(result)
        return result

    def _state(self, passes: Passes) -> ModelState:
        if not passes:
            return self.root
        key = self.key(passes)
        if key in self._states:
            return self._states[key]
        parent = self._state(passes[:-1])
        self.check_time()
        began = self.clock()
        step, new = next(apply_steps(parent, Recipe(passes=[passes[-1]]), self.task, ctx=self.ctx, opset=self.opset))
        self._states[key] = new
        self._steps[key] = (tuple(step.notes), self.clock() - began)
        return new

    def _measure(self, key: str, parent: str | None, passes: Passes, rung: int, state: ModelState) -> Evaluated:
        recipe = Recipe(name="plan", passes=list(passes))
        artifact = stamp_recipe(compact_names(state.onnx), recipe)
        opts = self.options
        first = measure(artifact, self.task, threads=opts.host_threads, runs=opts.latency_runs, rss=opts.rss)
        p50, p95 = [first.latency_p50_ms], [first.latency_p95_ms]
        for _ in range(opts.latency_repeats - 1):
            again = measure(artifact, self.task, threads=opts.host_threads, runs=opts.latency_runs, rss=False)
            p50.append(again.latency_p50_ms)
            p95.append(again.latency_p95_ms)
        # Interference on a shared host only ever adds time, so the least disturbed repeat is the best estimate.
        measurement = first.model_copy(update={"latency_p50_ms": min(p50), "latency_p95_ms": min(p95)})
        correct = run_onnx(artifact, self.task.x_val).argmax(axis=1) == self.task.y_val
        notes, seconds = self._steps.get(key, ((), 0.0))
        result = Evaluated(key, parent, passes, rung, artifact, measurement, correct, notes, seconds, cached=False)
        if self.cache is not None:
            self.cache.put(key, CachedResult(artifact, measurement, correct, notes, seconds))
        return result

    def refresh_latency(self) -> None:
        """Measure every fresh result's latency once more, later in time, keeping the lower p95.

        On a shared host interference only ever adds time and comes in bursts that can cover back-to-back repeats;
        a measurement minutes later rarely falls in the same burst. Stops quietly when the time budget is spent.
        """
        opts = self.options
        for key, result in list(self.results.items()):
            if result.cached or (self.deadline is not None and self.clock() >= self.deadline):
                continue
            again = measure(result.artifact, self.task, threads=opts.host_threads, runs=opts.latency_runs, rss=False)
            old = result.measurement
            if again.latency_p95_ms >= old.latency_p95_ms:
                continue
            better = old.model_copy(
                update={
                    "latency_p95_ms": again.latency_p95_ms,
                    "latency_p50_ms": min(old.latency_p50_ms, again.latency_p50_ms),
                }
            )
            self.results[key] = dataclasses.replace(result, measurement=better)
            if self.cache is not None:
                self.cache.put(key, CachedResult(result.artifact, better, result.correct, result.notes, result.seconds))

    def release(self) -> None:
        """Drop the in-memory models (the measured results stay)."""
        self._states.clear()
