"""A rollback with nothing to go back to (issue 13, item 5): the job fails `no_previous_model`, the model stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from agentkit import Fleet, build_manifest, tiny_model

from edgefleet.agent.agent import Agent
from edgefleet.protocols.codes import ResultCode
from edgefleet.protocols.commands import RollbackCommand
from edgefleet.protocols.manifest import SignedManifest

pytestmark = pytest.mark.mqtt


def _deploy(fleet: Fleet, tmp_path: Path, device: str, seed: int, *, version: int, job: str) -> SignedManifest:
    model = tiny_model(seed, pad_bytes=9000)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=version, keys=fleet.keys)
    fleet.controller.deploy(device, signed, job_id=job)
    assert fleet.controller.wait_final(device, job).state.value == "active"
    return signed


def _rollback(fleet: Fleet, device: str, job: str, *, target: int | None) -> None:
    now = datetime.now(UTC)
    command = RollbackCommand(job_id=job, issued_at=now, expires_at=now + timedelta(minutes=5), target_version=target)
    fleet.controller.send(device, command)


def _digest(agent: Agent) -> str | None:
    current = agent.slots.current()
    return current.digest if current else None


def test_rollback_of_a_first_model_fails_no_previous_model_and_keeps_it(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("dev-first")
    v1 = _deploy(fleet, tmp_path, "dev-first", 1, version=1, job="job-1")
    _rollback(fleet, "dev-first", "job-2", target=None)
    event = fleet.controller.wait_final("dev-first", "job-2")
    assert (event.state.value, event.result, event.model_version) == ("failed", ResultCode.NO_PREVIOUS_MODEL, 1)
    assert event.detail == "no previous model to go back to: v1 is the only model on this device; it keeps running it"
    assert _digest(agent) == v1.manifest.sha256  # the device keeps running its model
    assert agent.infer(np.ones((1, 4), dtype=np.float32)).outputs.shape == (1, 3)
    # the refusal left the job it ran alone: its id is still answered as active, a new deploy still goes through
    assert agent.updater.record.job_id == "job-1"
    assert agent.updater.record.state.value == "active"
    _deploy(fleet, tmp_path, "dev-first", 2, version=2, job="job-3")


def test_rollback_to_a_version_the_previous_slot_does_not_hold(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("dev-other")
    _deploy(fleet, tmp_path, "dev-other", 1, version=1, job="job-1")
    v2 = _deploy(fleet, tmp_path, "dev-other", 2, version=2, job="job-2")
    _rollback(fleet, "dev-other", "job-3", target=5)
    event = fleet.controller.wait_final("dev-other", "job-3")
    assert (event.state.value, event.result, event.model_version) == ("failed", ResultCode.NO_PREVIOUS_MODEL, 2)
    assert event.detail == (
        "no previous model of v5 to go back to: the previous slot holds v1; this device keeps running v2"
    )
    assert _digest(agent) == v2.manifest.sha256
