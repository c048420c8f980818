"""The container image definitions: what they copy exists, the agent image installs no torch, both run unprivileged.

No Docker engine runs here, so the Dockerfiles are read, not built; the agent image's own build step also fails if
torch, sqlmodel or prometheus_client got in.
"""

from __future__ import annotations

import re
from importlib.metadata import requires

import pytest
from deploykit import DEPLOY, REPO

DOCKER = DEPLOY / "docker"


def instructions(name: str) -> list[tuple[str, str]]:
    text = (DOCKER / name).read_text(encoding="utf-8").replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


@pytest.mark.parametrize(
    ("name", "user"), [("Dockerfile.controller", "edgefleet"), ("Dockerfile.agent", "edgefleet-agent")]
)
def test_images_copy_only_what_exists_and_run_unprivileged(name: str, user: str) -> None:
    rows = instructions(name)
    assert [r for r in rows if r[0] == "FROM"], name
    for word, rest in rows:
        if word == "COPY" and "--from=" not in rest:
            *sources, _ = rest.split()
            for source in sources:
                assert (REPO / source).exists(), f"{name} copies {source}, which the repository lacks"
    users = [rest for word, rest in rows if word == "USER"]
    assert users == [user]
    assert any(word == "ENTRYPOINT" for word, _ in rows)
    ignore = (DOCKER / f"{name}.dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignore, "the context must start from nothing"
    assert ignore.index("*") < min(i for i, line in enumerate(ignore) if line.startswith("!"))
    copied = {rest.split()[0] for word, rest in rows if word == "COPY" and "--from=" not in rest}
    for source in copied:
        assert f"!{source.rstrip('/')}/" in ignore or f"!{source}" in ignore, f"{source} is not let into the context"


def test_the_agent_image_installs_the_agent_extra_without_torch() -> None:
    rows = instructions("Dockerfile.agent")
    installs = " ".join(rest for word, rest in rows if word == "RUN" and "pip install" in rest)
    assert '".[agent]"' in installs
    assert "torch" not in installs.replace("'torch'", "")  # only the check that it is absent names it
    assert "find_spec" in installs
    agent_extra = [r for r in requires("edgefleet") or [] if re.search(r"extra\s*==\s*['\"]agent['\"]", r)]
    assert agent_extra
    assert not [r for r in agent_extra if re.match(r"(torch|sqlmodel|prometheus)", r)]


def test_the_controller_image_pins_torch_first_and_serves_metrics() -> None:
    rows = instructions("Dockerfile.controller")
    run = next(rest for word, rest in rows if word == "RUN" and "pip install" in rest and "TORCH_PIN" in rest)
    assert run.index("TORCH_PIN") < run.index('".[controller]"')
    env = " ".join(rest for word, rest in rows if word == "ENV")
    assert "EDGEFLEET_METRICS_HOST=0.0.0.0" in env
    assert ("EXPOSE", "9464") in rows
    assert ("CMD", '["serve"]') in rows
