"""Candidate generation and search: recipes from the constraint analysis, explored by successive halving.

Why successive halving (Jamieson & Talwalkar, 2016) and not a Bayesian multi-objective search such as Optuna's:

- The space is small and discrete once the constraint analysis has spoken: a handful of structural chains (distil
  to width w, prune a fraction 1 - w, factorize) with strengths computed from how far the fp32 model misses its
  budgets, each optionally followed by one ONNX-level pass. A surrogate model has little to learn there.
- What a chain costs on the device (bytes, RSS, latency) is fixed by its structure and does not improve with more
  fine-tuning; only accuracy does. So one cheap rung (one fine-tune epoch) measures the costs exactly and drops the
  chains that cannot fit; the remaining budget goes where successive halving puts it, into more epochs for the most
  accurate survivors. That is the cheap-fidelity-first structure successive halving is made for.
- Evaluating a whole rung at once lets recipes share prefixes (one distillation feeds its pruned, factorized,
  int8 and fp16 children), which a sequential one-trial-at-a-time sampler would not exploit.
- It is deterministic and needs no extra dependency (Optuna is not installed on the devices' build hosts here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefleet.compression.plan_evaluate import Evaluated, Evaluator, OutOfTimeError, Passes
from edgefleet.compression.plan_models import Candidate, Constraint, ConstraintAnalysis, PlanOptions
from edgefleet.compression.recipe import (
    DistillConfig,
    FactorizeConfig,
    FineTune,
    Fp16Config,
    PassConfig,
    PassKind,
    QatConfig,
    QuantizeDynamicConfig,
    QuantizeStaticConfig,
    StructuredPruneConfig,
)
from edgefleet.protocols.profile import DeviceProfile

__all__ = ["Search", "SearchOutcome", "chain_templates", "finals", "structural_need"]

log = logging.getLogger(__name__)
Step = tuple[PassKind, float]
Template = tuple[Step, ...]
Judge = Callable[[Evaluated], Candidate]
Progress = Callable[[int, int, str], None]
MIN_WIDTH, MAX_WIDTH = 0.15, 0.9
INT8_DROP_BEFORE_QAT = 0.005
MAX_ESCALATIONS = 2


def finals(*, gemm_heavy: bool) -> list[PassConfig]:
    """The ONNX-level last passes: static int8 (the defaults a user would pick), fp16 weights, dynamic int8."""
    out: list[PassConfig] = [QuantizeStaticConfig(), Fp16Config()]
    if gemm_heavy:
        out.append(QuantizeDynamicConfig())
    return out


def int8_with_qat(epochs: int) -> QuantizeStaticConfig:
    """Static int8 that falls back to quantization-aware fine-tuning when it loses more than half a point."""
    return QuantizeStaticConfig(max_accuracy_drop=INT8_DROP_BEFORE_QAT, qat=QatConfig(epochs=epochs))


def _width(value: float) -> float:
    return round(min(MAX_WIDTH, max(MIN_WIDTH, value)), 2)


def chain_templates(need: float, *, limit: int) -> list[Template]:
    """Structural chains for a model that must shrink `need` times (parameters and compute scale with width²)."""
    if need <= 1.0:
        return []
    w1, w2 = _width(1 / math.sqrt(need * 1.15)), _width(1 / math.sqrt(need * 1.6))
    out: list[Template] = [
        ((PassKind.DISTILL, w1),),
        ((PassKind.PRUNE_STRUCTURED, round(1 - w1, 2)),),
        ((PassKind.DISTILL, w2),),
        ((PassKind.PRUNE_STRUCTURED, round(1 - w2, 2)),),
        ((PassKind.DISTILL, w1), (PassKind.FACTORIZE, 0.9)),
        ((PassKind.PRUNE_STRUCTURED, round(1 - w1, 2)), (PassKind.FACTORIZE, 0.9)),
    ]
    if w2 < 0.5:
        split = _width(math.sqrt(w2))
        out.append(((PassKind.DISTILL, split), (PassKind.PRUNE_STRUCTURED, round(1 - split, 2))))
    unique = list(dict.fromkeys(out))
    return unique[:limit]


def materialize(template: Template, *, epochs: int, options: PlanOptions) -> Passes:
    """The pass configs of a template at a fidelity (fine-tune epochs; distillation trains `distill_epoch_factor`x)."""
    budget = options.finetune_time_budget_s
    tune = FineTune(epochs=epochs, time_budget_s=budget)
    out: list[PassConfig] = []
    for kind, strength in template:
        if kind == PassKind.DISTILL:
            distill_epochs = epochs * options.distill_epoch_factor
            out.append(DistillConfig(width=strength, epochs=distill_epochs, time_budget_s=budget))
        elif kind == PassKind.PRUNE_STRUCTURED:
            out.append(StructuredPruneConfig(amount=strength, finetune=tune))
        else:
            out.append(FactorizeConfig(energy=strength, finetune=tune))
    return tuple(out)


def structural_need(
    analysis: ConstraintAnalysis, fp32: Candidate, root_finals: list[Candidate], profile: DeviceProfile
) -> float:
    """How many times the structure must shrink, after the best ONNX-level pass has done what it can."""
    need = 1.0
    storage = analysis.needs.get(Constraint.STORAGE)
    if storage is not None:
        sizes = [c.measurement.file_bytes for c in root_finals if not c.incompatible]
        ratio = fp32.measurement.file_bytes / min(sizes) if sizes else 1.0
        need = max(need, storage / max(ratio, 1.0))
    latency = analysis.needs.get(Constraint.LATENCY)
    if latency is not None:
        # Only int8 on a CPU with int8 dot-product is a latency remedy; fp16 weights run the same float kernels.
        speedups = [
            fp32.predicted_latency_ms / c.predicted_latency_ms
            for c in root_finals
            if profile.int8_dot_product
            and c.recipe.passes[-1].kind == PassKind.QUANTIZE_STATIC
            and not c.incompatible
            and c.predicted_latency_ms > 0
        ]
        need = max(need, latency / max([1.0, *speedups]))
    ram = analysis.needs.get(Constraint.RAM)
    if ram is not None:
        need = max(need, min(ram, 50.0))
    return need


@dataclass
class SearchOutcome:
    evaluated: list[Evaluated] = field(default_factory=list)
    timed_out: bool = False
    rungs: list[str] = field(default_factory=list)


class Search:
    """Successive halving over structural chains (see the module docstring); every measured node is a candidate."""

    def __init__(
        self,
        evaluator: Evaluator,
        analysis: ConstraintAnalysis,
        profile: DeviceProfile,
        *,
        options: PlanOptions,
        judge: Judge,
        onnx_only: bool,
        gemm_heavy: bool,
        progress: Progress | None = None,
    ) -> None:
        self.ev, self.analysis, self.profile, self.options = evaluator, analysis, profile, options
        self.judge, self.onnx_only, self.gemm_heavy = judge, onnx_only, gemm_heavy
        self.progress = progress
        self.outcome = SearchOutcome()
        self._done = 0
        self._total = 0

    def _tick(self, what: str) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress(self._done, max(self._total, self._done), what)

    def _run(self, passes: Passes, rung: int) -> Evaluated | None:
        result = self.ev.evaluate(passes, rung=rung)
        self._tick(" > ".join(p.kind.value for p in passes) or "fp32")
        return result

    def run(self, fp32: Candidate) -> SearchOutcome:
        try:
            self._search(fp32)
        except OutOfTimeError:
            self.outcome.timed_out = True
            self.outcome.rungs.append("time budget reached: stopped with the candidates measured so far")
        self.outcome.evaluated = list(self.ev.results.values())
        return self.outcome

    def _search(self, fp32: Candidate) -> None:
        epochs = self.options.rung_epochs
        root_finals = finals(gemm_heavy=self.gemm_heavy)
        self._total += len(root_finals)
        judged = [c for f in root_finals if (c := self._final((), f, 0, epochs[0], fp32)) is not None]
        if self.onnx_only:
            self.outcome.rungs.append("ONNX-only model: only quantize_static, quantize_dynamic and fp16 apply")
            return
        need = structural_need(self.analysis, fp32, judged, self.profile)
        templates = self._first_rung(need, epochs[0])
        for rung, rung_epochs in enumerate(epochs[1:], start=1):
            if not templates:
                return
            scores = {t: self._chain(t, rung, rung_epochs)[0] for t in templates}
            self._record(rung, rung_epochs, scores)
            templates = self._survivors(scores)

    def _first_rung(self, need: float, epochs: int) -> list[Template]:
        """Rung 0; when no chain fits structurally, escalate the reduction by the measured shortfall and retry.

        Parameters scale with width², but latency and file size have fixed parts that do not shrink, so the first
        estimate can fall short; the measured ratio of the closest chain says by how much.
        """
        for attempt in range(MAX_ESCALATIONS + 1):
            templates = chain_templates(need, limit=self.options.max_chains)
            self.outcome.rungs.append(f"structural reduction needed: {need:.2f}x -> {len(templates)} chains")
            if not templates:
                return []
            results = {t: self._chain(t, 0, epochs) for t in templates}
            scores = {t: r[0] for t, r in results.items()}
            self._record(0, epochs, scores)
            if any(s is not None for s in scores.values()):
                return self._survivors(scores)
            shortfall = min(r[1] for r in results.values())
            if attempt == MAX_ESCALATIONS or not math.isfinite(shortfall):
                return []
            need *= max(1.25, 1.3 * shortfall)
        return []

    def _record(self, rung: int, epochs: int, scores: dict[Template, float | None]) -> None:
        best = max((s for s in scores.values() if s is not None), default=None)
        shown = f"{best:.4f}" if best is not None else "none fits structurally"
        self.outcome.rungs.append(f"rung {rung} ({epochs} epochs): {len(scores)} chains, best {shown}")

    def _survivors(self, scores: dict[Template, float | None]) -> list[Template]:
        ranked = sorted((t for t, s in scores.items() if s is not None), key=lambda t: -(scores[t] or 0.0))
        return ranked[: max(1, math.ceil(len(ranked) / self.options.eta))] if ranked else []

    def _chain(self, template: Template, rung: int, epochs: int) -> tuple[float | None, float]:
        """Evaluate a chain (each prefix) and its useful last passes.

        Returns the best accuracy among nodes that fit structurally (None if none does) and the smallest shortfall
        (largest value / budget over the resource constraints, minimised over the nodes; inf if none was measured).
        """
        passes = materialize(template, epochs=epochs, options=self.options)
        self._total += len(passes)
        end: Evaluated | None = None
        for depth in range(1, len(passes) + 1):
            end = self._run(passes[:depth], rung)
            if end is None:
                return None, math.inf
        assert end is not None  # noqa: S101 - a template has at least one step
        nodes = [self.judge(end)]
        children = [f for f in finals(gemm_heavy=self.gemm_heavy) if self._useful(nodes[0], f)]
        self._total += len(children)
        nodes.extend(c for f in children if (c := self._final(passes, f, rung, epochs, nodes[0])) is not None)
        fitting = [c.measurement.accuracy for c in nodes if _fits_structurally(c)]
        shortfall = min((_shortfall(c) for c in nodes if not c.incompatible), default=math.inf)
        return (max(fitting) if fitting else None), shortfall

    def _final(self, passes: Passes, final: PassConfig, rung: int, epochs: int, parent: Candidate) -> Candidate | None:
        """A last pass after `passes`; static int8 that loses too much is retried with the QAT fallback."""
        result = self._run((*passes, final), rung)
        if result is None:
            return None
        child = self.judge(result)
        lost = parent.measurement.accuracy - child.measurement.accuracy
        if final.kind != PassKind.QUANTIZE_STATIC or lost <= INT8_DROP_BEFORE_QAT or self.onnx_only:
            return child
        self._total += 1
        retried = self._run((*passes, int8_with_qat(epochs)), rung)
        if retried is None:
            return child
        better = self.judge(retried)
        return better if better.measurement.accuracy > child.measurement.accuracy else child

    def _useful(self, node: Candidate, final: PassConfig) -> bool:
        """Add a last pass to a chain only if it addresses a violated constraint and could make the chain fit."""
        violated = self.analysis.violated
        storage = node.check(Constraint.STORAGE)
        expected_ratio = {PassKind.QUANTIZE_STATIC: 3.5, PassKind.FP16: 1.9, PassKind.QUANTIZE_DYNAMIC: 3.0}
        if Constraint.STORAGE in violated and storage.value / expected_ratio[final.kind] <= storage.budget * 1.15:
            return True
        return (
            final.kind == PassKind.QUANTIZE_STATIC and Constraint.LATENCY in violated and self.profile.int8_dot_product
        )


def _shortfall(candidate: Candidate) -> float:
    """The largest value / budget over storage, RAM and latency (<= 1 when they all fit)."""
    return max(c.value / c.budget for c in candidate.checks if c.constraint != Constraint.ACCURACY)


def _fits_structurally(candidate: Candidate) -> bool:
    """Fits every budget except accuracy (which more fine-tuning may still improve)."""
    return not candidate.incompatible and all(c.fits for c in candidate.checks if c.constraint != Constraint.ACCURACY)
