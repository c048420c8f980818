"""A full deploy to a few devices over a real Mosquitto: download, verify, install, validate, activate, report."""

from __future__ import annotations

import numpy as np
import pytest
from agentkit import Fleet, build_manifest, tiny_model

pytestmark = pytest.mark.mqtt


def test_deploy_to_three_devices_activates_and_reports(fleet: Fleet, tmp_path) -> None:
    model = tiny_model(1, pad_bytes=20_000)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=1, keys=fleet.keys)
    devices = [fleet.start_agent(f"dev-{i}") for i in range(3)]
    for agent in devices:
        fleet.controller.deploy(agent.config.device_id, signed, job_id="job-1")
    for agent in devices:
        event = fleet.controller.wait_final(agent.config.device_id, "job-1")
        assert (event.state.value, event.result) == ("active", 0)
        assert event.model_version == 1
        current = agent.slots.current()
        assert current is not None
        assert current.digest == signed.manifest.sha256
    states = [e.state.value for e in fleet.controller.events["dev-0"] if e.job_id == "job-1"]
    assert states[0] == "downloading"
    assert "verifying" in states
    assert "validating" in states
    # blocks were broadcast: the server sent the artifact about once, not once per device
    blocks = signed.manifest.block_total
    assert fleet.controller.server.stats.blocks_sent <= 2 * blocks
    result = devices[0].infer(np.zeros((2, 4), dtype=np.float32), label=1)
    assert result.outputs.shape == (2, 3)
    assert fleet.controller.births["dev-0"], "birth on connect"
