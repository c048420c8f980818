"""One measurement function: sizes, parameters, accuracy, latency, the RSS of a fresh process without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from edgefleet.compression import initial_state, measure
from edgefleet.compression.measure import peak_rss_bytes, transfer_bytes

if TYPE_CHECKING:
    from conftest import Trained


def test_measure_fills_every_field_and_ratios(digits: Trained) -> None:
    data = initial_state(digits.model, digits.task).onnx
    base = measure(data, digits.task, runs=30, warmup=5)
    assert base.file_bytes == len(data)
    assert 0 < base.transfer_bytes < base.file_bytes
    assert base.parameters == base.nonzero_parameters > 5000
    assert 0.0 <= base.accuracy <= 1.0
    assert 0 < base.latency_p50_ms <= base.latency_p95_ms
    assert base.peak_rss_bytes is not None
    assert 10 * 2**20 < base.peak_rss_bytes < 2**30
    assert base.size_ratio is None
    same = measure(data, digits.task, runs=30, warmup=5, rss=False, baseline=base)
    assert same.size_ratio == pytest.approx(1.0)
    assert same.accuracy_delta == pytest.approx(0.0)
    assert same.rss_ratio is None


def test_transfer_bytes_rewards_zeros() -> None:
    assert transfer_bytes(bytes(10_000)) < 100


def test_rss_probe_runs_without_torch(digits: Trained) -> None:
    data = initial_state(digits.model, digits.task).onnx
    assert peak_rss_bytes(data, digits.task.input_shape, runs=3) > 10 * 2**20
