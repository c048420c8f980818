"""Everything is verified before it runs: each bad manifest or artifact is refused with its own result code,
and the model that was running keeps running."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from agentkit import Fleet, build_manifest, new_keys, tiny_model

from edgefleet.agent.agent import Agent
from edgefleet.protocols.codes import ResultCode
from edgefleet.protocols.manifest import SignedManifest

pytestmark = pytest.mark.mqtt


def _active_v1(fleet: Fleet, tmp_path: Path) -> tuple[Agent, SignedManifest]:
    model = tiny_model(1, pad_bytes=9000)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=1, keys=fleet.keys)
    agent = fleet.start_agent("dev-v")
    fleet.controller.deploy("dev-v", signed, job_id="job-v1")
    assert fleet.controller.wait_final("dev-v", "job-v1").state.value == "active"
    return agent, signed


def _assert_still_v1(agent: Agent, v1: SignedManifest) -> None:
    current = agent.slots.current()
    assert current is not None
    assert current.digest == v1.manifest.sha256
    assert agent.infer(np.ones((1, 4), dtype=np.float32)).outputs.shape == (1, 3)


def _refused(fleet: Fleet, signed: SignedManifest, job: str) -> ResultCode:
    fleet.controller.deploy("dev-v", signed, job_id=job)
    event = fleet.controller.wait_final("dev-v", job)
    assert event.state.value == "failed"
    assert event.model_version == 1
    return event.result


def test_tampered_manifest_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    agent, v1 = _active_v1(fleet, tmp_path)
    model = tiny_model(2)
    fleet.controller.offer(model, tmp_path)
    good = build_manifest(model, version=2, keys=fleet.keys)
    tampered = good.model_copy(update={"manifest": good.manifest.model_copy(update={"metrics": {"accuracy": 0.99}})})
    assert _refused(fleet, tampered, "job-tamper") is ResultCode.SIGNATURE_INVALID
    _assert_still_v1(agent, v1)


def test_unknown_key_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    agent, v1 = _active_v1(fleet, tmp_path)
    model = tiny_model(2)
    fleet.controller.offer(model, tmp_path)
    other = build_manifest(model, version=2, keys=new_keys())
    assert _refused(fleet, other, "job-key") is ResultCode.UNKNOWN_KEY
    _assert_still_v1(agent, v1)


def test_downgrade_and_replay_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    agent, v1 = _active_v1(fleet, tmp_path)
    model = tiny_model(3)
    fleet.controller.offer(model, tmp_path)
    same_version = build_manifest(model, version=1, keys=fleet.keys)
    assert _refused(fleet, same_version, "job-replay") is ResultCode.DOWNGRADE_REFUSED
    _assert_still_v1(agent, v1)


def test_expired_manifest_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    agent, v1 = _active_v1(fleet, tmp_path)
    model = tiny_model(2)
    fleet.controller.offer(model, tmp_path)
    expired = build_manifest(model, version=2, keys=fleet.keys, expires_in=timedelta(seconds=-30))
    assert _refused(fleet, expired, "job-expired") is ResultCode.EXPIRED
    _assert_still_v1(agent, v1)


def test_incompatible_opset_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    agent, v1 = _active_v1(fleet, tmp_path)
    model = tiny_model(2)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=2, keys=fleet.keys, opset=18)
    assert _refused(fleet, signed, "job-opset") is ResultCode.UNSUPPORTED
    _assert_still_v1(agent, v1)


def test_tampered_artifact_on_the_server_fails_integrity(fleet: Fleet, tmp_path: Path) -> None:
    agent, v1 = _active_v1(fleet, tmp_path)
    model = tiny_model(2, pad_bytes=9000)
    digest = fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=2, keys=fleet.keys)
    path = fleet.controller.artifacts[digest]
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF  # block 1 of the served copy no longer matches the signed block list
    path.write_bytes(bytes(data))
    assert _refused(fleet, signed, "job-badblock") is ResultCode.INTEGRITY_FAILURE
    _assert_still_v1(agent, v1)
    assert not (agent.config.data_dir / "slots" / "b" / "meta.json").exists()


def test_block_corrupted_in_transit_is_asked_again_and_never_written(fleet: Fleet, tmp_path: Path) -> None:
    from edgefleet.agent.config import Faults

    model = tiny_model(4, pad_bytes=20_000)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=1, keys=fleet.keys)
    agent = fleet.start_agent("dev-c", faults=Faults(corrupt_blocks=frozenset({2, 3})))
    fleet.controller.deploy("dev-c", signed, job_id="job-c")
    event = fleet.controller.wait_final("dev-c", "job-c")
    assert (event.state.value, event.result) == ("active", ResultCode.OK)
    current = agent.slots.current()
    assert current is not None
    assert current.model_path.read_bytes() == model
    # two corrupted arrivals cost exactly two extra block sends
    assert fleet.controller.server.stats.blocks_sent == signed.manifest.block_total + 2
