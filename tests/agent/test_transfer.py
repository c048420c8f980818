"""Transfer faults: an agent restart mid-download, a broker restart mid-transfer, a server that never answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentkit import Fleet, build_manifest, fleet_on, tiny_model

from edgefleet.agent.agent import Agent
from edgefleet.protocols.blocks import BlockRequest, decode_block
from edgefleet.protocols.codes import ResultCode

pytestmark = pytest.mark.mqtt


def test_interrupted_download_resumes_and_fetches_only_what_was_missing(fleet: Fleet, tmp_path: Path) -> None:
    model = tiny_model(5, pad_bytes=60_000)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=1, keys=fleet.keys)
    total = signed.manifest.block_total
    held_before_cut = 6
    server = fleet.controller.server
    publish = server._publish
    sent: list[int] = []

    def stingy(topic: str, payload: bytes, qos: int) -> int | None:
        index = decode_block(payload).index
        if phase == 1 and index >= held_before_cut:
            return None  # the link "breaks" here: later blocks never leave the controller
        sent.append(index)
        return publish(topic, payload, qos)

    server._publish = stingy
    phase = 1
    # the bitmap is persisted after every block here, so the count below is exact (by default: 8 blocks, 0.25 s)
    agent = fleet.start_agent("dev-r", request_timeout_s=5.0, bitmap_flush_blocks=1, bitmap_flush_s=0.0)
    fleet.controller.deploy("dev-r", signed, job_id="job-r")
    assert fleet.run_until(lambda: agent.updater.fetcher is not None and agent.updater.fetcher.download.have == 6)
    agent.crash()  # power cut in the middle of the download
    fleet.run_until(lambda: False, timeout=0.2)
    assert sorted(sent) == list(range(held_before_cut))

    phase, sent[:] = 2, []
    requests: list[BlockRequest] = []
    handle = server.handle_request

    def spy(topic: str, payload: bytes) -> bool:
        requests.append(BlockRequest.model_validate_json(payload))
        return handle(topic, payload)

    server.handle_request = spy  # type: ignore[method-assign]
    restarted = fleet.start_agent("dev-r", bitmap_flush_blocks=1, bitmap_flush_s=0.0)
    event = fleet.controller.wait_final("dev-r", "job-r")
    assert (event.state.value, event.result) == ("active", ResultCode.OK)
    assert sorted(sent) == list(range(held_before_cut, total)), "only the missing blocks were sent again"
    assert len(requests[0].bitmap()) == total - held_before_cut
    current = restarted.slots.current()
    assert current is not None
    assert current.model_path.read_bytes() == model


def test_broker_restart_mid_transfer(tmp_path: Path, managed_broker: Any, keys: Any) -> None:
    with fleet_on(tmp_path, managed_broker.host, managed_broker.port, keys) as fleet:
        model = tiny_model(6, pad_bytes=120_000)
        fleet.controller.offer(model, tmp_path)
        signed = build_manifest(model, version=1, keys=keys)
        total = signed.manifest.block_total
        fleet.controller.server.rate = 60_000.0  # ~2 s for the artifact, so the restart lands mid-transfer
        agents: list[Agent] = [fleet.start_agent(f"dev-b{i}") for i in range(2)]
        for agent in agents:
            fleet.controller.deploy(agent.config.device_id, signed, job_id="job-b")

        def held() -> int:
            fetcher = agents[0].updater.fetcher
            return fetcher.download.have if fetcher is not None else 0

        assert fleet.run_until(lambda: held() >= total // 3)
        managed_broker.restart()
        for agent in agents:
            event = fleet.controller.wait_final(agent.config.device_id, "job-b", timeout=30)
            assert (event.state.value, event.result) == ("active", ResultCode.OK)
            current = agent.slots.current()
            assert current is not None
            assert current.model_path.read_bytes() == model
        # re-fetching only what was missing (plus what was in flight at the restart), not the whole artifact again
        assert fleet.controller.server.stats.blocks_sent < 2 * total


def test_silent_server_fails_with_connection_lost_instead_of_hanging(fleet: Fleet, tmp_path: Path) -> None:
    model = tiny_model(7)
    signed = build_manifest(model, version=1, keys=fleet.keys)  # never offered: nobody answers
    agent = fleet.start_agent("dev-s", request_timeout_s=0.1, request_timeout_max_s=0.2, max_request_attempts=3)
    fleet.controller.deploy("dev-s", signed, job_id="job-s")
    event = fleet.controller.wait_final("dev-s", "job-s", timeout=10)
    assert (event.state.value, event.result) == ("failed", ResultCode.CONNECTION_LOST)
    assert fleet.controller.requests == 3
    assert agent.slots.current() is None
