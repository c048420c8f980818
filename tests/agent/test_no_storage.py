"""A full or read-only disk under a download is a result code (`no_storage`), not a spinning loop (issue 15, item 2).

Seen before: the block write's error escaped the MQTT callback and the same packet was handled again, 145,135
identical tracebacks in three minutes and never a job event. Here the device's block writes fail with ENOSPC (and
with EROFS), as a full or read-only partition makes them fail; the job must end `failed` / `no_storage` with the
reason, and the same agent must take the next deploy once there is space again.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from agentkit import Fleet, build_manifest, tiny_model

from edgefleet.agent import download as download_module
from edgefleet.protocols.codes import ResultCode

pytestmark = pytest.mark.mqtt


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_mid_download_fails_the_job_with_no_storage(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    model = tiny_model(3, pad_bytes=40_000)
    fleet.controller.offer(model, tmp_path)
    signed = build_manifest(model, version=1, keys=fleet.keys)
    agent = fleet.start_agent(f"dev-full-{code}")
    device = agent.config.device_id
    real_pwrite = os.pwrite
    writes = [0]

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        writes[0] += 1
        if writes[0] >= 2:  # the first block fits, then the partition is full
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(download_module.os, "pwrite", full_disk)
    with caplog.at_level(logging.WARNING):
        fleet.controller.deploy(device, signed, job_id="job-full")
        event = fleet.controller.wait_final(device, "job-full", timeout=20)
    assert (event.state.value, event.result) == ("failed", ResultCode.NO_STORAGE)
    assert os.strerror(code) in (event.detail or "")
    assert agent.slots.current() is None
    failures = [r for r in caplog.records if "job-full" in r.getMessage() and r.levelno >= logging.ERROR]
    assert len(failures) <= 5, f"{len(failures)} error lines: the failure is handled again and again"

    monkeypatch.setattr(download_module.os, "pwrite", real_pwrite)  # space again: the same agent goes on
    fleet.controller.deploy(device, signed, job_id="job-after")
    event = fleet.controller.wait_final(device, "job-after", timeout=20)
    assert (event.state.value, event.result) == ("active", 0)
