"""Transfer faults: an agent restart mid-download, a broker restart mid-transfer, a server that never answers;
many devices sharing one broadcast; a busy loop not taken for a silent server."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from agentkit import FLEET, PROFILE, Fleet, build_manifest, fleet_on, tiny_model

from edgefleet.agent.agent import Agent
from edgefleet.agent.download import Download
from edgefleet.agent.reactor import Reactor
from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
from edgefleet.agent.transfer import Fetcher
from edgefleet.protocols.blocks import Block, BlockRequest, decode_block
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


def test_many_devices_fetching_one_artifact_cost_about_one_artifact_of_output(fleet: Fleet, tmp_path: Path) -> None:
    devices = 40
    spec = SimulatorSpec(
        devices=devices,
        profile=PROFILE,
        data_root=tmp_path / "sim",
        fleet=FLEET,
        host=fleet.host,
        port=fleet.port,
        id_prefix="many",
        trusted_keys=fleet.keys.trusted,
        telemetry_window_s=3600.0,
        probation_s=0.2,
    )
    sim = FleetSimulator(spec, reactor=fleet.reactor)
    sim.start()
    try:
        assert sim.run(duration=20, until=lambda: sim.connected == devices)
        model = tiny_model(11, pad_bytes=120_000)
        fleet.controller.offer(model, tmp_path)
        signed = build_manifest(model, version=1, keys=fleet.keys)
        server = fleet.controller.server
        # the server's defaults for a fleet: wait for the requests to settle, and do not resend what just went out
        server.coalesce_s, server.resend_holdoff_s = 0.5, 3.0
        for i in range(devices):
            fleet.controller.deploy(spec.device_id(i), signed, job_id="job-many")
        for i in range(devices):
            event = fleet.controller.wait_final(spec.device_id(i), "job-many", timeout=60)
            assert (event.state.value, event.result) == ("active", ResultCode.OK)
        ratio = server.stats.payload_bytes_sent / len(model)
        assert ratio <= 1.5, f"{devices} devices cost {ratio:.2f} artifacts of output ({server.stats})"
    finally:
        sim.stop()


def test_a_busy_loop_is_not_taken_for_silence(tmp_path: Path) -> None:
    """Blocks waiting unread on the socket when the quiet timer fires (the loop was busy) are not asked for again."""
    data = bytes(range(256)) * 64  # four 4 KiB blocks
    blocks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    hashes = [hashlib.sha256(b).hexdigest() for b in blocks]
    reactor = Reactor()
    reader, writer = socket.socketpair()
    reader.setblocking(False)  # noqa: FBT003
    download = Download(tmp_path, artifact="ab" * 32, size=len(data), block_size=4096, block_hashes=hashes)
    requests: list[BlockRequest] = []
    done: list[str] = []
    fetcher = Fetcher(
        download,
        reactor,
        send_request=lambda r: requests.append(r) is None,
        on_complete=lambda: done.append("ok"),
        on_fail=lambda code, detail: done.append(f"{code}: {detail}"),
        timeout_s=0.05,
        timeout_max_s=0.05,
        max_attempts=3,
    )

    class Feed:
        def handle_read(self) -> None:
            index = reader.recv(1)[0]
            fetcher.on_block(Block("ab" * 32, index, blocks[index], hashes[index]))

        def handle_write(self) -> None:
            pass

    reactor.add_reader(reader, Feed())

    def busy_then_block(index: int) -> None:
        writer.send(bytes([index]))  # the block arrives while the loop is stuck in this callback...
        time.sleep(0.15)  # ...for longer than the quiet timeout

    try:
        fetcher.start()
        assert len(requests) == 1
        for index in range(len(blocks)):
            reactor.call_later(0.03 * index, lambda i=index: busy_then_block(i))
        assert reactor.run(until=lambda: bool(done), timeout=5)
        assert done == ["ok"]
        assert len(requests) == 1, "no block was asked for again: they were waiting on the socket, not lost"
    finally:
        reactor.remove(reader)
        reader.close()
        writer.close()
        reactor.close()


def test_bytes_forever_unread_do_not_stop_the_timeout(tmp_path: Path) -> None:
    """A connection that always has unread bytes (none of them blocks) still ends in CONNECTION_LOST, not a hang."""
    reactor = Reactor()
    download = Download(tmp_path, artifact="cd" * 32, size=100, block_size=4096, block_hashes=["00" * 32])
    requests: list[BlockRequest] = []
    done: list[ResultCode] = []
    fetcher = Fetcher(
        download,
        reactor,
        send_request=lambda r: requests.append(r) is None,
        on_complete=lambda: done.append(ResultCode.OK),
        on_fail=lambda code, detail: done.append(code),
        input_pending=lambda: True,
        timeout_s=0.02,
        timeout_max_s=0.04,
        max_attempts=2,
    )
    try:
        fetcher.start()
        assert reactor.run(until=lambda: bool(done), timeout=5)
        assert done == [ResultCode.CONNECTION_LOST]
        assert len(requests) == 2, "the first request and one re-request, each after its patience ran out"
    finally:
        reactor.close()


def test_a_link_flapping_faster_than_the_timeout_still_ends_in_connection_lost(tmp_path: Path) -> None:
    reactor = Reactor()
    download = Download(tmp_path, artifact="ef" * 32, size=100, block_size=4096, block_hashes=["00" * 32])
    done: list[ResultCode] = []
    fetcher = Fetcher(
        download,
        reactor,
        send_request=lambda r: True,
        on_complete=lambda: done.append(ResultCode.OK),
        on_fail=lambda code, detail: done.append(code),
        timeout_s=60.0,
        timeout_max_s=60.0,
        max_attempts=3,
    )
    try:
        fetcher.start()
        fetcher.reconnected()  # the first reconnect is free: blocks may simply have been cut off
        for _ in range(3):
            if not done:
                fetcher.reconnected()
        assert done == [ResultCode.CONNECTION_LOST]
    finally:
        fetcher.cancel()
        reactor.close()
