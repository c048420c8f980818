"""Validation of a freshly installed model before it is switched on: the manifest's samples and the latency budget.

A sample *agrees* when its argmax matches the expected output's (or, with `tolerances.top1_margin`, when the
device's top-1 is that close to the expected top-1 in `expected`: a near-tie that another CPU's rounding may
flip), and is *close* when every element satisfies `|got - want| <= abs_tol + rel_tol * |want|`. The model passes
when the agreeing fraction reaches `tolerances.top1_agreement`, the close fraction reaches
`tolerances.close_fraction` (`min_close`, else `top1_agreement`), and the p95 latency of the timed runs (a simulated
device's scaled by device / host on the reference workload; the lowest p95 of three rounds, as interference only
adds time) stays within the latency budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgefleet.agent.errors import InferenceError
from edgefleet.agent.runner import ModelRunner
from edgefleet.protocols.manifest import InlineTensor, Manifest, Tolerances

__all__ = ["ValidationOutcome", "to_array", "validate_model"]


@dataclass(frozen=True, slots=True)
class ValidationOutcome:
    ok: bool
    detail: str
    agreement: float
    close: float
    p95_latency_ms: float


def to_array(tensor: InlineTensor) -> np.ndarray:
    return np.frombuffer(tensor.raw(), dtype=np.dtype(tensor.dtype).newbyteorder("<")).reshape(tensor.shape)


def _agrees(got: np.ndarray, want: np.ndarray, tol: Tolerances) -> bool:
    """Same argmax on every row; with `top1_margin`, a differing one counts when the expected values of the two
    picks are closer than the margin (int8 rounding on another CPU can swap a near-tie, not a clear winner)."""
    picked, best = got.argmax(axis=-1), want.argmax(axis=-1)
    same = np.asarray(picked == best)
    if tol.top1_margin is None or want.ndim == 0 or bool(same.all()):
        return bool(same.all())
    want64 = want.astype(np.float64)
    gap = want64.max(axis=-1) - np.take_along_axis(want64, np.expand_dims(picked, -1), axis=-1)[..., 0]
    return bool(np.all(same | (gap < tol.top1_margin)))


def _p95(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 95)) if values else 0.0


def validate_model(
    runner: ModelRunner,
    manifest: Manifest,
    *,
    latency_budget_ms: float | None,
    timed_runs: int = 60,
    rounds: int = 3,
) -> ValidationOutcome:
    """Run every validation sample (and repeat them up to `timed_runs` for latency); never raises for a bad model.

    Latency is judged on the lowest p95 of `rounds` consecutive rounds of the timed runs: interference from other
    work on the device (or, for simulated devices, on the host) only ever adds time and comes in bursts, so one burst
    spoils one round, not the model's verdict. A model that is really too slow is slow in every round."""
    tol = manifest.tolerances
    samples = manifest.validation_samples
    agree = close = 0
    latencies: list[float] = []
    try:
        if samples:  # untimed: the first run of a fresh session allocates its buffers (several times a warm run)
            runner.run_feeds({name: to_array(t) for name, t in samples[0].inputs.items()})
        for sample in samples:
            feeds = {name: to_array(t) for name, t in sample.inputs.items()}
            outputs, latency = runner.run_feeds(feeds)
            latencies.append(latency)
            sample_close = sample_agree = True
            for name, want_t in sample.expected.items():
                got, want = outputs.get(name), to_array(want_t)
                if got is None or got.shape != want.shape:
                    sample_close = sample_agree = False
                    continue
                diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
                sample_close &= bool(np.all(diff <= tol.abs_tol + tol.rel_tol * np.abs(want.astype(np.float64))))
                sample_agree &= _agrees(got, want, tol)
            agree += sample_agree
            close += sample_close
        while samples and len(latencies) < timed_runs:
            sample = samples[len(latencies) % len(samples)]
            latencies.append(runner.run_feeds({n: to_array(t) for n, t in sample.inputs.items()})[1])
    except InferenceError as exc:
        return ValidationOutcome(
            ok=False, detail=f"validation run failed: {exc}", agreement=0.0, close=0.0, p95_latency_ms=0.0
        )
    total = max(1, len(samples))
    agreement, closeness = (agree / total, close / total) if samples else (1.0, 1.0)
    parts = [list(part) for part in np.array_split(np.asarray(latencies), min(max(1, rounds), max(1, len(latencies))))]
    p95_ms = min(_p95(part) for part in parts) * 1000.0
    if agreement < tol.top1_agreement:
        detail = f"top-1 agreement {agreement:.3f} below {tol.top1_agreement:.3f} on {len(samples)} samples"
        return ValidationOutcome(ok=False, detail=detail, agreement=agreement, close=closeness, p95_latency_ms=p95_ms)
    if closeness < tol.close_fraction:
        detail = (
            f"only {closeness:.3f} of samples within tolerance (abs {tol.abs_tol}, rel {tol.rel_tol}), "
            f"below {tol.close_fraction:.3f}"
        )
        return ValidationOutcome(ok=False, detail=detail, agreement=agreement, close=closeness, p95_latency_ms=p95_ms)
    if latency_budget_ms is not None and p95_ms > latency_budget_ms:
        detail = f"p95 latency {p95_ms:.2f} ms over the budget of {latency_budget_ms:.2f} ms"
        return ValidationOutcome(ok=False, detail=detail, agreement=agreement, close=closeness, p95_latency_ms=p95_ms)
    return ValidationOutcome(
        ok=True,
        detail=f"{len(samples)} samples ok, p95 {p95_ms:.2f} ms",
        agreement=agreement,
        close=closeness,
        p95_latency_ms=p95_ms,
    )
