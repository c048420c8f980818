"""The reference workload's builder and the host's cached reference times (the planner's side of the speed model)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgefleet.compression.host_speed import host_key, host_reference
from edgefleet.compression.reference_workload import build_workload
from edgefleet.protocols.profile import ReferenceTimes

SHIPPED = Path(__file__).resolve().parents[2] / "agent" / "workload"


def test_the_shipped_workload_is_what_the_builder_makes(tmp_path: Path) -> None:
    """Change compression/reference_workload.py, then rebuild agent/workload: the two never drift apart."""
    digests = build_workload(tmp_path)
    shipped = json.loads((SHIPPED / "workload.json").read_text())["models"]
    assert {name: entry["sha256"] for name, entry in shipped.items()} == digests
    assert (tmp_path / "workload.json").read_text() == (SHIPPED / "workload.json").read_text()


def test_the_host_is_timed_once_then_read_from_the_cache(tmp_path: Path) -> None:
    measured = host_reference(cache_dir=tmp_path)  # a real subprocess: edgefleet-agent speed-factor --json
    assert all(ms > 0 for ms in measured.model_dump().values())
    cached = tmp_path / f"{host_key(1)}.json"
    assert ReferenceTimes.model_validate_json(cached.read_bytes()) == measured
    # Another process finds the file: planted numbers come back as they are, nothing is re-measured.
    planted = ReferenceTimes(fp32_conv=9.0, fp32_matmul=8.0, int8_conv=7.0, int8_matmul=6.0)
    cached.write_text(planted.model_dump_json())
    assert host_reference(cache_dir=tmp_path) == planted
    # Older than max_age_s: the host is timed again, in the load it has now.
    old = time.time() - 601
    os.utime(cached, (old, old))
    assert host_reference(cache_dir=tmp_path) != planted
    # A broken cache file is measured again and replaced, never half-read.
    cached.write_text("{not json")
    again = host_reference(cache_dir=tmp_path)
    assert again != planted
    assert ReferenceTimes.model_validate_json(cached.read_bytes()) == again
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary file left behind


def test_the_key_changes_with_the_thread_count() -> None:
    assert host_key(1) != host_key(2)
