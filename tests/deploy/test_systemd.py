"""The systemd units: `systemd-analyze verify` where it exists, and the hardening the issue asks for."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
from deploykit import DEPLOY, tool

UNITS = DEPLOY / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text(encoding="utf-8").replace("\\\n", " "))
    return parser


def test_systemd_analyze_verifies_both_units(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing: install Debian's `systemd` package (make services does)")
    # verify checks that ExecStart's program exists: point it at this venv's entry points.
    bin_dir = str(Path(sys.executable).parent) + "/"
    names = ["edgefleet-controller.service", "edgefleet-agent.service"]
    for name in names:
        text = (UNITS / name).read_text(encoding="utf-8").replace("/opt/edgefleet/bin/", bin_dir)
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in names)]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == [], "\n".join(ours)


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing: install Debian's `systemd` package (make services does)")
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nExecStart=/nonexistent/edgefleet serve\nRestart=sometimes\n", encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60, check=False)
    assert "broken.service" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "user", "state"),
    [
        ("edgefleet-agent.service", "edgefleet-agent", "edgefleet-agent"),
        ("edgefleet-controller.service", "edgefleet", "edgefleet"),
    ],
)
def test_units_are_hardened(name: str, user: str, state: str) -> None:
    service = unit(name)["Service"]
    assert service["User"] == user
    assert service["NoNewPrivileges"] == "yes"
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == state
    assert service["StateDirectoryMode"] == "0700"
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert unit(name)["Install"]["WantedBy"] == "multi-user.target"
    sysusers = (UNITS / "edgefleet.sysusers.conf").read_text(encoding="utf-8")
    assert f"u {user} " in sysusers


def test_the_agent_gets_its_password_as_a_credential() -> None:
    service = unit("edgefleet-agent.service")["Service"]
    assert service["LoadCredential"] == "mqtt-password:/etc/edgefleet/agent.password"
    assert "--password-file %d/mqtt-password" in service["ExecStart"]
    assert "edgefleet-agent run" in service["ExecStart"]
    env = (UNITS / "agent.env.example").read_text(encoding="utf-8")
    for variable in ("EDGEFLEET_MQTT_HOST", "EDGEFLEET_FLEET", "EDGEFLEET_DEVICE_CLASS", "EDGEFLEET_DEVICE_ID"):
        assert f"${{{variable}}}" in service["ExecStart"]
        assert f"{variable}=" in env
    # TLS arguments unbraced: systemd splits them into words (and drops an empty value)
    assert "$EDGEFLEET_AGENT_TLS_ARGS" in service["ExecStart"]
    assert "EDGEFLEET_AGENT_TLS_ARGS=--tls-ca " in env
