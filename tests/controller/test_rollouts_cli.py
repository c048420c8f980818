"""`edgefleet rollout ...`: start, list, status (tables and JSON), pause/resume/abort, and bad input (exit 1 or 2)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fleet(ready, tiny_onnx: Path):
    ready.ok("device", "register", "--class", "rpi4", *[f"--id=pi-{i}" for i in range(10)])
    ready.ok("model", "add", "tiny", "--onnx", str(tiny_onnx))
    ready.ok("artifact", "add", "tiny", "--class", "rpi4")
    return ready


def test_start_list_status_pause_resume_abort(fleet) -> None:
    started = fleet.json("rollout", "start", "rpi4:1", "--class", "rpi4", "--canary", "10%", "--growth", "3")
    assert started["state"] == "pending"
    assert [w["planned"] for w in started["waves"]] == [1, 3, 6]
    assert started["targets"] == 10
    (listed,) = fleet.json("rollout", "list")
    assert (listed["id"], listed["state"], listed["artifact"]) == (1, "pending", "tiny v1")
    assert fleet.json("rollout", "status")["id"] == 1  # the latest by default
    table = fleet.ok("rollout", "status", "1")
    assert "rollout 1" in table
    assert "canary" in table
    assert fleet.json("rollout", "pause", "1")["state"] == "paused"
    paused = fleet("rollout", "status", "1", "--watch", "--interval", "0.1")
    assert paused.exit_code == 4  # paused, nothing in flight: nothing left to wait for but an operator
    assert "`edgefleet rollout resume 1` goes on" in paused.output
    assert fleet.json("rollout", "resume", "1", "--waive", "latency_p95")["state"] == "running"
    assert fleet.json("rollout", "status", "1")["gate_config"]["waived"] == ["latency_p95"]
    assert fleet.json("rollout", "abort", "1", "--reason", "test") == {"id": 1, "rollbacks": 0, "state": "aborted"}
    watched = fleet("rollout", "status", "1", "--watch", "--json", "--interval", "0.1")
    assert '"state": "aborted"' in watched.output  # a finished rollout: one view, then the watch ends
    assert watched.exit_code == 3  # the outcome is the exit code: aborted
    assert fleet("rollout", "status", "1").exit_code == 3


def test_gates_show_latency_in_milliseconds() -> None:
    """All else is in ms; the latency gate printed seconds to three decimals (`latency_p95 0.001 vs 0.0005`)."""
    from edgefleet.controller.cli.rollout import _breach_line, _gate_number

    assert _gate_number("latency_p95", 0.0005) == "0.5 ms"
    assert _gate_number("latency_p95", 0.00213) == "2.13 ms"
    assert _gate_number("accuracy", 0.9166) == "0.9166"
    line = _breach_line({"wave": 0, "action": "abort", "gates": [
        {"name": "latency_p95", "value": 0.003, "threshold": 0.002, "detail": ""}]})  # fmt: skip
    assert "latency_p95 3 ms vs 2 ms (judged)" in line


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["rollout", "start", "rpi4:1", "--canary", "0"], 2, "at least 1"),
        (["rollout", "start", "rpi4:1", "--canary", "lots"], 2, "not a device count"),
        (["rollout", "start", "rpi4:1", "--canary", "150%"], 2, "at most 100"),
        (["rollout", "start", "rpi4:1", "--on-breach", "explode"], 2, "explode"),
        (["rollout", "start", "rpi4:1", "--growth", "0.5"], 2, "growth"),
        (["rollout", "start", "rpi4:7"], 1, "artifact 'rpi4:7' does not exist"),
        (["rollout", "start", "rpi4:1", "--class", "x86-gateway"], 1, "built for class rpi4"),
        (["rollout", "start", "rpi4:1", "--device", "nobody"], 1, "no devices in class rpi4"),
        (["rollout", "pause", "42"], 1, "rollout 42 does not exist"),
        (["rollout", "status"], 1, "no rollouts yet"),
        (["rollout", "abort", "x"], 2, "{rollout_id}"),
    ],
)
def test_bad_input_gets_one_clear_error(fleet, args: list[str], code: int, message: str) -> None:
    result = fleet(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert fleet.json("rollout", "list") == []


def test_state_errors_name_the_rollout(fleet) -> None:
    fleet.ok("rollout", "start", "rpi4:1")
    again = fleet("rollout", "start", "rpi4:1")
    assert again.exit_code == 1
    assert "rollout 1 to class rpi4 is pending" in again.output
    resumed = fleet("rollout", "resume", "1")
    assert resumed.exit_code == 1
    assert "only a paused one resumes" in resumed.output
    waived = fleet("rollout", "pause", "1")
    assert waived.exit_code == 0
    unknown = fleet("rollout", "resume", "1", "--waive", "vibes")
    assert unknown.exit_code == 1
    assert "unknown gate(s) vibes" in unknown.output
