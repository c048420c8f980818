"""The device's validation rule (agent/validate.py) on outputs it is handed: closeness, argmax agreement with and
without `top1_margin`, `min_close`, and old manifests (no optional fields) judged, and serialised, as before.

The runner is the one boundary faked here: it answers each sample's input with the outputs a test chose, so the
rule is checked exactly; tests/controller/test_validation_set.py runs it on real models and other CPUs' kernels.
"""

from __future__ import annotations

import json
from typing import Any, cast

import numpy as np
import pytest
from agentkit import build_manifest, new_keys, tiny_model
from pydantic import ValidationError

from edgefleet.agent.runner import ModelRunner
from edgefleet.agent.validate import to_array, validate_model
from edgefleet.protocols.manifest import InlineTensor, Manifest, Tolerances, ValidationSample
from edgefleet.protocols.signing import canonical_bytes

SAMPLES = 16
CLASSES = 10


def _tensor(a: np.ndarray) -> InlineTensor:
    return InlineTensor.from_bytes(a.astype("<f4").tobytes(), dtype="float32", shape=a.shape)


def _expected(index: int, *, margin: float = 2.0) -> np.ndarray:
    """Logits with the top-1 at class index % 10, `margin` above the runner-up at (index + 1) % 10."""
    y = np.linspace(-1.0, 0.0, CLASSES, dtype=np.float32)[np.arange(CLASSES) - index % CLASSES]
    y[index % CLASSES], y[(index + 1) % CLASSES] = 1.0 + margin, 1.0
    return y.reshape(1, CLASSES)


class _Runner:
    """Answers sample i's input (x = [[i, 0, 0, 0]]) with `outputs[i]`."""

    def __init__(self, outputs: list[np.ndarray]) -> None:
        self.outputs = outputs

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        return {"y": self.outputs[int(feeds["x"][0, 0])]}, 0.001


def _manifest(tolerances: Tolerances, expected: list[np.ndarray]) -> Manifest:
    samples = tuple(
        ValidationSample(
            inputs={"x": _tensor(np.array([[i, 0, 0, 0]], np.float32))}, expected={"y": _tensor(want)}, label=None
        )
        for i, want in enumerate(expected)
    )
    base = build_manifest(tiny_model(1), version=1, keys=new_keys(), samples=samples).manifest
    return base.model_copy(update={"tolerances": tolerances})


def _validate(tolerances: Tolerances, expected: list[np.ndarray], got: list[np.ndarray]) -> Any:
    runner = cast("ModelRunner", _Runner(got))
    return validate_model(runner, _manifest(tolerances, expected), latency_budget_ms=None)


def _swap_top2(y: np.ndarray) -> np.ndarray:
    out = y.copy()
    first, second = np.argsort(y[0])[-2:][::-1]
    out[0, first], out[0, second] = y[0, second], y[0, first]
    return out


def test_old_tolerances_need_every_argmax_and_every_sample_close_by_default() -> None:
    expected = [_expected(i, margin=0.01 if i == 3 else 2.0) for i in range(SAMPLES)]
    tol = Tolerances(abs_tol=0.05, rel_tol=0.0)  # no min_close, no top1_margin: top1_agreement 1.0 for both
    assert _validate(tol, expected, list(expected)).ok
    flipped = [_swap_top2(y) if i == 3 else y for i, y in enumerate(expected)]  # a near-tie of 0.01 swaps
    outcome = _validate(tol, expected, flipped)
    assert not outcome.ok
    assert outcome.agreement == pytest.approx(15 / 16)
    off = [y + np.float32(0.2) * (i == 5) for i, y in enumerate(expected)]  # one sample 0.2 off, same argmax
    outcome = _validate(tol, expected, off)
    assert (outcome.ok, outcome.agreement, outcome.close) == (False, 1.0, pytest.approx(15 / 16))
    assert "below 1.000" in outcome.detail


def test_top1_margin_lets_only_near_ties_swap() -> None:
    near = [_expected(i, margin=0.3 if i < 4 else 2.0) for i in range(SAMPLES)]
    tol = Tolerances(abs_tol=0.5, rel_tol=0.0, top1_agreement=1.0, top1_margin=0.4)
    swapped = [_swap_top2(y) for y in near]  # every sample's top two swap places
    outcome = _validate(tol, near, swapped)
    assert outcome.agreement == pytest.approx(4 / 16)  # the four near-ties (0.3 < 0.4) agree; clear winners do not
    assert not outcome.ok
    assert "top-1 agreement" in outcome.detail
    only_ties = [_swap_top2(y) if i < 4 else y for i, y in enumerate(near)]
    outcome = _validate(tol, near, only_ties)
    assert outcome.ok, outcome.detail
    assert outcome.agreement == 1.0
    strict = tol.model_copy(update={"top1_margin": None})
    assert _validate(strict, near, only_ties).agreement == pytest.approx(12 / 16)
    # the margin is read from the expected values: a device cannot widen it with outputs of its own
    far_pick = [y.copy() for y in near]
    far_pick[0][0, int(np.argmin(near[0][0]))] = 9.0  # picks the expected last class, 1.3 + 1 below the top
    assert _validate(tol, near, far_pick).agreement == pytest.approx(15 / 16)


def test_min_close_leaves_room_for_a_few_outliers_not_for_many() -> None:
    expected = [_expected(i) for i in range(SAMPLES)]
    tol = Tolerances(abs_tol=0.1, rel_tol=0.0, top1_agreement=0.9, min_close=0.75, top1_margin=0.2)
    assert tol.close_fraction == 0.75

    def outliers(count: int) -> list[np.ndarray]:
        # like an AVX2 kernel's int16 saturation: one logit of a few samples far off, the argmax kept
        got = [y.copy() for y in expected]
        for y in got[:count]:
            y[0, int(np.argmin(y[0]))] -= 0.8
        return got

    outcome = _validate(tol, expected, outliers(4))
    assert outcome.ok, outcome.detail
    assert outcome.close == pytest.approx(12 / 16)
    outcome = _validate(tol, expected, outliers(5))
    assert not outcome.ok
    assert "below 0.750" in outcome.detail
    shuffled = [expected[(i + 1) % SAMPLES] for i in range(SAMPLES)]  # another model's answers
    outcome = _validate(tol, expected, shuffled)
    assert (outcome.ok, outcome.agreement, outcome.close) == (False, 0.0, 0.0)


def test_optional_tolerances_are_left_out_of_the_json_when_unset() -> None:
    """Manifests that predate min_close and top1_margin serialise, and so verify, byte for byte as before."""
    old = Tolerances(abs_tol=0.01, rel_tol=0.02, top1_agreement=0.95)
    assert old.model_dump(mode="json") == {"abs_tol": 0.01, "rel_tol": 0.02, "top1_agreement": 0.95}
    assert Tolerances.model_validate({"abs_tol": 0.01, "rel_tol": 0.02, "top1_agreement": 0.95}) == old
    assert Tolerances.model_validate({"abs_tol": 0.01, "min_close": None}).close_fraction == 1.0
    manifest = _manifest(old, [_expected(0)])
    assert b"min_close" not in canonical_bytes(manifest)
    assert b"top1_margin" not in canonical_bytes(manifest)
    new = Tolerances(abs_tol=0.4, rel_tol=0.0, top1_agreement=0.9, min_close=0.75, top1_margin=0.8)
    data = json.loads(new.model_dump_json())
    assert (data["min_close"], data["top1_margin"]) == (0.75, 0.8)
    assert Tolerances.model_validate_json(new.model_dump_json()) == new
    with_new = _manifest(new, [_expected(0)])
    assert Manifest.model_validate_json(with_new.model_dump_json()).tolerances == new
    for bad in ({"min_close": 1.5}, {"min_close": -0.1}, {"top1_margin": -1.0}):
        with pytest.raises(ValidationError):
            Tolerances.model_validate(bad)


def test_samples_decode_as_the_device_reads_them() -> None:
    want = _expected(3)
    manifest = _manifest(Tolerances(), [want])
    np.testing.assert_array_equal(to_array(manifest.validation_samples[0].expected["y"]), want)
