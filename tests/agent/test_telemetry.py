"""Telemetry: windows with counts and latency buckets; windows made while offline arrive after reconnect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agentkit import Fleet, build_manifest, fleet_on, tiny_model

from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS

pytestmark = pytest.mark.mqtt


def _activate(fleet: Fleet, tmp_path: Path, device: str, **overrides: Any) -> Any:
    model = tiny_model(1)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=1, keys=fleet.keys)
    agent = fleet.start_agent(device, **overrides)
    fleet.controller.deploy(device, signed, job_id="job-t")
    assert fleet.controller.wait_final(device, "job-t").state.value == "active"
    return agent


def test_window_carries_counts_buckets_accuracy_and_digest(fleet: Fleet, tmp_path: Path) -> None:
    agent = _activate(fleet, tmp_path, "dev-w")
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    predicted = int(agent.infer(x).predicted[0])
    for _ in range(9):
        agent.infer(x, label=predicted)
    agent.infer(x, label=(predicted + 1) % 3)
    agent._close_window()
    assert fleet.run_until(lambda: len(fleet.controller.telemetry["dev-w"]) >= 1)
    batch = fleet.controller.telemetry["dev-w"][-1]
    assert batch.inference_count == 11
    assert len(batch.latency_counts) == len(LATENCY_BUCKETS_SECONDS) + 1
    assert sum(batch.latency_counts) == 11
    assert (batch.labelled_count, batch.correct_count) == (10, 9)
    assert batch.model_digest == agent.slots.current().digest
    assert batch.mean_top1_confidence is not None
    assert batch.rss_bytes is not None
    assert batch.rss_bytes > 0


def test_windows_made_offline_are_delivered_after_reconnect_none_lost(
    tmp_path: Path, managed_broker: Any, keys: Any
) -> None:
    with fleet_on(tmp_path, managed_broker.host, managed_broker.port, keys, session_expiry_s=600) as fleet:
        agent = _activate(fleet, tmp_path, "dev-o", telemetry_window_s=0.1)
        x = np.zeros((1, 4), dtype=np.float32)
        total = 0

        def infer_for(seconds: float) -> None:
            nonlocal total
            end = fleet.reactor.clock() + seconds
            while fleet.reactor.clock() < end:
                agent.infer(x)
                total += 1
                fleet.reactor.run_once(max_wait=0.01)

        infer_for(0.3)
        managed_broker.stop()
        infer_for(0.8)  # about eight windows made while the broker is down
        assert len(agent.telemetry.spool) >= 3, "offline windows wait on disk"
        managed_broker.start()
        infer_for(0.3)
        agent._close_window()

        def delivered() -> int:
            return sum(b.inference_count for b in fleet.controller.telemetry["dev-o"])

        assert fleet.run_until(lambda: delivered() >= total, timeout=20), (delivered(), total)
        batches = fleet.controller.telemetry["dev-o"]
        seqs = sorted({b.seq for b in batches})
        assert seqs == list(range(len(seqs))), "no window lost"
        assert delivered() == total
        assert len(agent.telemetry.spool) == 0


def test_a_model_switch_closes_the_window_so_none_mixes_two_models(fleet: Fleet, tmp_path: Path) -> None:
    agent = _activate(fleet, tmp_path, "dev-m")
    x = np.zeros((1, 4), dtype=np.float32)
    for _ in range(5):
        agent.infer(x)
    v1 = agent.slots.current().digest
    model = tiny_model(2)
    fleet.controller.offer(model, tmp_path)
    fleet.controller.deploy("dev-m", build_manifest(model, version=2, keys=fleet.keys), job_id="job-m2")
    assert fleet.controller.wait_final("dev-m", "job-m2").state.value == "active"
    v2 = agent.slots.current().digest
    assert v2 != v1
    for _ in range(3):
        agent.infer(x)
    agent._close_window()
    assert fleet.run_until(lambda: sum(b.model_digest == v2 for b in fleet.controller.telemetry["dev-m"]) >= 1)
    counts: dict[str | None, int] = {}
    for batch in fleet.controller.telemetry["dev-m"]:
        counts[batch.model_digest] = counts.get(batch.model_digest, 0) + batch.inference_count
    assert counts.get(v1) == 5, "the old model's inferences are reported under the old model"
    assert counts.get(v2) == 3, "the new model's window holds only its own inferences"
