"""Install, validation, probation and rollback: the device ends on the old model or the new validated one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from agentkit import Fleet, build_manifest, tiny_model, validation_samples

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import Faults
from edgefleet.agent.errors import InferenceError
from edgefleet.protocols.codes import ResultCode
from edgefleet.protocols.commands import RollbackCommand
from edgefleet.protocols.manifest import SignedManifest

pytestmark = pytest.mark.mqtt


def _deploy(
    fleet: Fleet, tmp_path: Path, device: str, seed: int, *, version: int, job: str, **kw: object
) -> SignedManifest:
    model = tiny_model(seed, pad_bytes=9000)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=version, keys=fleet.keys, **kw)  # type: ignore[arg-type]
    fleet.controller.deploy(device, signed, job_id=job)
    return signed


def _digest(agent: Agent) -> str | None:
    current = agent.slots.current()
    return current.digest if current else None


def test_crash_during_install_resumes_to_the_new_validated_model(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("dev-i", faults=Faults(crash_during_install=True))
    v1 = _deploy(fleet, tmp_path, "dev-i", 1, version=1, job="job-1")
    assert fleet.run_until(lambda: not agent.alive)
    assert agent.updater.record.state.value == "installing"
    assert _digest(agent) is None, "a half-installed model is never current"
    restarted = fleet.start_agent("dev-i")
    event = fleet.controller.wait_final("dev-i", "job-1")
    assert (event.state.value, event.result) == ("active", ResultCode.OK)
    assert _digest(restarted) == v1.manifest.sha256
    assert restarted.infer(np.ones((1, 4), dtype=np.float32)).outputs.shape == (1, 3)


def test_crash_during_install_of_an_update_keeps_the_old_model_running_meanwhile(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("dev-u")
    v1 = _deploy(fleet, tmp_path, "dev-u", 1, version=1, job="job-1")
    fleet.controller.wait_final("dev-u", "job-1")
    agent.updater._crash_armed = True
    v2 = _deploy(fleet, tmp_path, "dev-u", 2, version=2, job="job-2")
    assert fleet.run_until(lambda: not agent.alive)
    assert _digest(agent) == v1.manifest.sha256
    restarted = fleet.start_agent("dev-u")
    event = fleet.controller.wait_final("dev-u", "job-2")
    assert (event.state.value, event.model_version) == ("active", 2)
    assert _digest(restarted) == v2.manifest.sha256


def test_validation_failure_rolls_back_by_itself(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("dev-f")
    v1 = _deploy(fleet, tmp_path, "dev-f", 1, version=1, job="job-1")
    fleet.controller.wait_final("dev-f", "job-1")
    wrong = validation_samples(tiny_model(2, pad_bytes=9000), perturb=0.5)  # expected outputs the model won't give
    _deploy(fleet, tmp_path, "dev-f", 2, version=2, job="job-2", samples=wrong)
    event = fleet.controller.wait_final("dev-f", "job-2")
    assert (event.state.value, event.result) == ("rolled_back", ResultCode.VALIDATION_FAILED)
    assert _digest(agent) == v1.manifest.sha256
    assert event.model_version == 1


def test_error_burst_in_probation_rolls_back_by_itself(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("dev-p", probation_s=0.0)
    v1 = _deploy(fleet, tmp_path, "dev-p", 1, version=1, job="job-1")
    fleet.controller.wait_final("dev-p", "job-1")
    agent.updater.probation_s = 30.0
    _deploy(fleet, tmp_path, "dev-p", 2, version=2, job="job-2")
    assert fleet.run_until(lambda: agent.updater.record.probation_until is not None)
    for _ in range(agent.config.probation_max_errors):
        with pytest.raises(InferenceError):
            agent.infer(np.ones((1, 7), dtype=np.float32))  # the app feeds inputs the new model rejects
    event = fleet.controller.wait_final("dev-p", "job-2")
    assert (event.state.value, event.result) == ("rolled_back", ResultCode.PROBATION_FAILED)
    assert _digest(agent) == v1.manifest.sha256


def test_crash_in_probation_rolls_back_on_restart(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("dev-q")
    v1 = _deploy(fleet, tmp_path, "dev-q", 1, version=1, job="job-1")
    fleet.controller.wait_final("dev-q", "job-1")
    agent.updater.probation_s = 30.0
    _deploy(fleet, tmp_path, "dev-q", 2, version=2, job="job-2")
    assert fleet.run_until(lambda: agent.updater.record.probation_until is not None)
    agent.crash()
    restarted = fleet.start_agent("dev-q")
    event = fleet.controller.wait_final("dev-q", "job-2")
    assert (event.state.value, event.result) == ("rolled_back", ResultCode.PROBATION_FAILED)
    assert _digest(restarted) == v1.manifest.sha256


def test_explicit_rollback_and_repeated_job_ids(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("dev-x")
    v1 = _deploy(fleet, tmp_path, "dev-x", 1, version=1, job="job-1")
    fleet.controller.wait_final("dev-x", "job-1")
    v2 = _deploy(fleet, tmp_path, "dev-x", 2, version=2, job="job-2")
    fleet.controller.wait_final("dev-x", "job-2")
    sent = fleet.controller.server.stats.blocks_sent
    before = len(fleet.controller.events["dev-x"])
    fleet.controller.deploy("dev-x", v2, job_id="job-2")  # repeated: answered, not redone
    assert fleet.run_until(lambda: len(fleet.controller.events["dev-x"]) > before)
    answer = fleet.controller.events["dev-x"][-1]
    assert (answer.job_id, answer.state.value, answer.model_version) == ("job-2", "active", 2)
    assert fleet.controller.server.stats.blocks_sent == sent
    now = datetime.now(UTC)
    fleet.controller.send(
        "dev-x", RollbackCommand(job_id="job-3", issued_at=now, expires_at=now + timedelta(minutes=5), target_version=1)
    )
    event = fleet.controller.wait_final("dev-x", "job-3")
    assert (event.state.value, event.result, event.model_version) == ("rolled_back", ResultCode.OK, 1)
    assert _digest(agent) == v1.manifest.sha256


def test_a_second_job_while_one_runs_is_answered_busy(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_agent("dev-y", request_timeout_s=5.0)
    model = tiny_model(3, pad_bytes=9000)
    signed = build_manifest(model, version=1, keys=fleet.keys)  # not offered: job-1 waits for blocks
    fleet.controller.deploy("dev-y", signed, job_id="job-1")
    assert fleet.run_until(lambda: fleet.controller.last_event("dev-y", "job-1") is not None)
    fleet.controller.deploy("dev-y", signed, job_id="job-2")
    event = fleet.controller.wait_final("dev-y", "job-2", timeout=5)
    assert (event.state.value, event.result) == ("failed", ResultCode.BUSY)


def test_configure_changes_the_telemetry_window_and_is_answered(fleet: Fleet) -> None:
    from edgefleet.protocols.commands import ConfigureCommand

    agent = fleet.start_agent("dev-k")
    now = datetime.now(UTC)
    command = ConfigureCommand(
        job_id="cfg-1", issued_at=now, expires_at=now + timedelta(minutes=5), telemetry_window_s=2.0
    )
    fleet.controller.send("dev-k", command)
    assert fleet.run_until(lambda: fleet.controller.last_event("dev-k", "cfg-1") is not None)
    assert agent.telemetry_window_s == 2.0


def test_configure_sets_threads_and_label_sampling(fleet: Fleet, tmp_path: Path) -> None:
    from edgefleet.protocols.commands import ConfigureCommand

    agent = fleet.start_agent("dev-t")
    _deploy(fleet, tmp_path, "dev-t", 1, version=1, job="job-1")
    assert fleet.controller.wait_final("dev-t", "job-1").state.value == "active"
    x = np.ones((1, 4), dtype=np.float32)
    agent.infer(x, label=0)
    before = agent.runner()
    now = datetime.now(UTC)
    command = ConfigureCommand(
        job_id="cfg-2", issued_at=now, expires_at=now + timedelta(minutes=5), threads=2, label_sample_rate=0.0
    )
    fleet.controller.send("dev-t", command)
    assert fleet.run_until(lambda: fleet.controller.last_event("dev-t", "cfg-2") is not None)
    assert agent.threads == 2
    after = agent.runner()
    assert after is not before, "the model is reloaded at the new thread count"
    labelled = agent.telemetry._current().labelled
    for _ in range(20):
        agent.infer(x, label=0)
    # (a window closing meanwhile starts again at 0, which stays below too)
    assert agent.telemetry._current().labelled <= labelled, "a rate of 0 counts no labels"


def test_garbage_commands_are_dropped_and_the_agent_keeps_working(fleet: Fleet, tmp_path: Path) -> None:
    from edgefleet.protocols import topics

    agent = fleet.start_agent("dev-g")
    for junk in (b"", b"\xff\xfe", b"{}", b'{"type": "deploy"}', b"[" * 10000):
        fleet.controller.link.publish(topics.command_topic("testfleet", "dev-g"), junk, qos=1)
    v1 = _deploy(fleet, tmp_path, "dev-g", 1, version=1, job="job-1")
    assert fleet.controller.wait_final("dev-g", "job-1").state.value == "active"
    assert _digest(agent) == v1.manifest.sha256
    assert agent._bad_messages == 5
