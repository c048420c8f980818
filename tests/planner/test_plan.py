"""The planner end to end on a tiny model: a fit with the binding constraint, nothing fits, cache, time budget."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from plankit import FAST, Tiny, make_profile

from edgefleet.compression.export import run_onnx
from edgefleet.compression.plan_cache import PlanCache
from edgefleet.compression.plan_models import Constraint
from edgefleet.compression.plan_pareto import front_table, write_front_plot
from edgefleet.compression.planner import plan
from edgefleet.compression.recipe import PassKind


def test_storage_bound_plan_on_a_tiny_torch_model(tiny: Tiny, tmp_path: Path) -> None:
    budget = len(tiny.onnx) // 2  # int8 alone (~3.5x smaller) fits; fp32 and fp16 (about half, plus overhead) do not
    profile = make_profile(storage_budget_bytes=budget)
    result = plan(tiny.model, tiny.task, profile, options=FAST)
    assert result.feasible
    assert result.chosen is not None
    assert result.artifact is not None
    assert len(result.artifact) <= budget
    assert result.binding == Constraint.STORAGE
    assert result.analysis is not None
    assert result.analysis.violated == [Constraint.STORAGE]
    assert result.chosen.recipe.passes[-1].kind in {PassKind.QUANTIZE_STATIC, PassKind.QUANTIZE_DYNAMIC}
    # the artifact is a real model that says how it was made and still classifies
    model = onnx.load_from_string(result.artifact)
    assert any(p.key == "edgefleet.recipe" for p in model.metadata_props)
    accuracy = np.mean(run_onnx(result.artifact, tiny.task.x_val).argmax(1) == tiny.task.y_val)
    assert accuracy == result.chosen.measurement.accuracy
    assert [c.kind for c in result.contributions] == [p.kind for p in result.chosen.recipe.passes]
    assert result.contributions[-1].bytes_after < result.contributions[0].bytes_before
    assert result.chosen.key in {c.key for c in result.front}
    assert "chosen" in front_table(result)
    png = write_front_plot(result, tmp_path / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_bound_plan_uses_structural_passes(tiny: Tiny) -> None:
    fp32 = plan(tiny.model, tiny.task, make_profile(), options=FAST).fp32
    assert fp32 is not None
    # fp32 misses the latency budget 4x (a margin no timing noise on a shared host closes); no int8 dot-product,
    # so int8 does not count as a latency fix
    budget = fp32.predicted_latency_ms / 4
    result = plan(tiny.model, tiny.task, make_profile(latency_budget_ms=budget, int8_dot_product=False), options=FAST)
    assert result.analysis is not None
    assert result.analysis.violated == [Constraint.LATENCY]
    structural = {PassKind.DISTILL, PassKind.PRUNE_STRUCTURED, PassKind.FACTORIZE}
    tried = {p.kind for c in result.candidates for p in c.recipe.passes}
    assert tried & structural
    if result.feasible:
        assert result.chosen is not None
        assert result.binding == Constraint.LATENCY
        assert result.chosen.predicted_latency_ms <= budget


def test_nothing_fits_answers_with_the_closest_candidate(tiny: Tiny) -> None:
    result = plan(tiny.onnx, tiny.task, make_profile(storage_budget_bytes=1024), options=FAST)
    assert not result.feasible
    assert result.chosen is None
    assert result.artifact is None
    assert result.closest is not None
    storage = [m for m in result.misses if m.constraint == Constraint.STORAGE]
    assert storage
    assert storage[0].miss > 1.0  # more than twice the budget
    assert result.closest.measurement.file_bytes == min(c.measurement.file_bytes for c in result.candidates)


def test_second_plan_hits_the_cache_for_every_candidate(tiny: Tiny, tmp_path: Path) -> None:
    profile = make_profile(storage_budget_bytes=len(tiny.onnx) // 2)
    first_cache = PlanCache(tmp_path / "cache")
    first = plan(tiny.onnx, tiny.task, profile, options=FAST, cache=first_cache)
    assert first_cache.hits == 0
    assert first_cache.misses == len(first.candidates)
    assert first_cache.entries() == len(first.candidates)
    second_cache = PlanCache(tmp_path / "cache")
    second = plan(tiny.onnx, tiny.task, profile, options=FAST, cache=second_cache)
    assert second_cache.misses == 0
    assert second_cache.hits == len(second.candidates)
    assert all(c.cached for c in second.candidates)
    assert second.chosen is not None
    assert first.chosen is not None
    assert second.chosen.recipe == first.chosen.recipe
    assert second.artifact == first.artifact
    # another profile reuses the same measurements: budgets are judged after the cache
    third_cache = PlanCache(tmp_path / "cache")
    plan(tiny.onnx, tiny.task, make_profile(), options=FAST, cache=third_cache)
    assert third_cache.misses == 0


def test_a_corrupt_cache_entry_is_recomputed(tiny: Tiny, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    plan(tiny.onnx, tiny.task, make_profile(), options=FAST, cache=PlanCache(cache_dir))
    victim = min(cache_dir.glob("*/*.onnx"))
    victim.write_bytes(b"not a model")
    again = PlanCache(cache_dir)
    result = plan(tiny.onnx, tiny.task, make_profile(), options=FAST, cache=again)
    assert again.misses == 1
    assert result.feasible


def test_time_budget_returns_the_best_fit_so_far(tiny: Tiny) -> None:
    ticks = itertools.count(step=100.0)
    options = FAST.model_copy(update={"time_budget_s": 50.0})
    result = plan(tiny.model, tiny.task, make_profile(), options=options, clock=lambda: float(next(ticks)))
    assert result.timed_out
    assert result.feasible  # the fp32 model fits this roomy profile and was measured before the budget ran out
    assert result.chosen is not None
    assert result.chosen.label == "fp32"


def test_an_opset_the_model_needs_above_the_profile_is_incompatible(tiny: Tiny) -> None:
    result = plan(tiny.onnx, tiny.task, make_profile(opset=13), options=FAST)
    assert not result.feasible
    assert result.incompatible
    assert "opset 17" in result.incompatible[0]
