"""README.md's "Running a fleet" walk-through, run as typed: a README edit that breaks it fails `make test`.

The first `sh` block under "## Running a fleet" is read from README.md and each command is run with bash, in order,
in a scratch directory holding `deploy/` (the operator's checkout), with:
- `HOME` a temporary directory, so `~/.edgefleet` (the default home) and `~/.cache` are fresh;
- the ports the README names (1884 for the broker, 9464 for the metrics) replaced by free ones;
- `.venv/bin` first on `PATH` (what `make venv` installs).
A line ending in `&` starts in the background in a process group of its own (ended by its group id at the end);
every other line must exit 0 within its time. Then the test checks what the walk-through promises: the rollout
completed, every device (the 20 first and the 5 added later) runs the model, Prometheus shows them, and the long
waits printed progress while their output went to a file. One run takes about three minutes on two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgefleet.controller.broker.mosquitto import find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
README_MQTT_PORT, README_METRICS_PORT = "1884", "9464"
# Seconds a foreground command may take (training and planning are the long ones; --watch waits for the rollout).
LIMITS = {"rollout status --watch": 600.0, "model add": 300.0, "compress class": 300.0}
DEFAULT_LIMIT = 120.0


def walkthrough(text: str) -> list[str]:
    """The commands of the first `sh` block after "## Running a fleet", continuation lines joined."""
    section = text.split("## Running a fleet", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block, "README.md's 'Running a fleet' has no ```sh block"
    commands: list[str] = []
    pending = ""
    for raw in block.group(1).splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def _code(line: str) -> str:
    """The command without its trailing comment (bash would drop it too; here it tells what the line is)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _end_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class Session:
    """The operator's shell: its environment, its working directory, its background jobs."""

    cwd: Path
    env: dict[str, str]
    ports: dict[str, str]
    background: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)

    def run(self, line: str) -> None:
        code = _code(line)
        for typed, free in self.ports.items():
            code = code.replace(typed, free)
        if code.startswith("export "):
            for word in shlex.split(code)[1:]:
                name, _, value = word.partition("=")
                self.env[name] = value
            self.transcript.append(f"$ {code}")
            return
        if code.endswith("&"):
            log = self.cwd / f"background-{len(self.background)}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    ["bash", "-c", code[:-1].strip()],
                    cwd=self.cwd,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.background.append((code, process, log))
            self.transcript.append(f"$ {code}   (pid {process.pid}, output in {log.name})")
            return
        if code.startswith("curl ") and shutil.which("curl") is None:  # the test reads the metrics itself below
            self.transcript.append(f"$ {code}   (skipped: curl is not installed here)")
            return
        limit = next((s for key, s in LIMITS.items() if key in code), DEFAULT_LIMIT)
        started = time.monotonic()
        with subprocess.Popen(
            ["bash", "-c", code], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        ) as process:  # fmt: skip
            try:
                stdout, stderr = process.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                _end_group(process.pid)
                stdout, _ = process.communicate(timeout=10)
                output = stdout.decode(errors="replace")[-3000:]
                pytest.fail(f"README command ran past {limit:.0f}s: {code}\n{output}\n{self.background_tails()}")
            _end_group(process.pid)  # nothing a foreground command started may outlive it
        done = subprocess.CompletedProcess(code, process.returncode, stdout, stderr)
        output = (done.stdout + done.stderr).decode(errors="replace")
        self.transcript.append(f"$ {code}   ({time.monotonic() - started:.1f} s, exit {done.returncode})\n{output}")
        assert done.returncode == 0, (
            f"README command failed (exit {done.returncode}): {code}\n{output[-4000:]}\n{self.background_tails()}"
        )

    def background_tails(self) -> str:
        parts = []
        for code, process, log in self.background:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            parts.append(f"--- {code} (exit {process.poll()})\n{tail}")
        return "\n".join(parts)

    def stop(self) -> None:
        """End the background jobs this test started, by their process group (SIGTERM, then SIGKILL)."""
        for _, process, _ in self.background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, process, _ in self.background:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[Session]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (work / "deploy").symlink_to(ROOT / "deploy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", COLUMNS="120")
    env.pop("XDG_CACHE_HOME", None)
    ports = {README_MQTT_PORT: str(_free_port()), README_METRICS_PORT: str(_free_port())}
    session = Session(cwd=work, env=env, ports=ports)
    try:
        yield session
    finally:
        session.stop()


def test_the_walkthrough_names_what_a_newcomer_needs() -> None:
    commands = walkthrough(README.read_text(encoding="utf-8"))
    text = "\n".join(commands)
    assert f"EDGEFLEET_MQTT_PORT={README_MQTT_PORT}" in text, "choosing the broker's port"
    assert "--trusted-key" in text, "the devices must trust the controller's key"
    assert text.count("device register") >= 2, "adding devices later"
    assert any(_code(c).endswith("&") and "broker run" in c for c in commands)
    assert any("rollout status --watch" in c for c in commands)


@pytest.mark.slow
@pytest.mark.mqtt
@pytest.mark.timeout(1500)
@pytest.mark.skipif(find_mosquitto() is None, reason="the mosquitto binary is missing (Debian's `mosquitto` package)")
def test_readme_walkthrough_as_typed(operator: Session) -> None:
    commands = walkthrough(README.read_text(encoding="utf-8"))
    for line in commands:
        operator.run(line)
    transcript = "\n".join(operator.transcript)

    watch = next(t for t in operator.transcript if "rollout status --watch" in t.splitlines()[0])
    progress = [line for line in watch.splitlines() if re.match(r"\d\d:\d\d:\d\d rollout \d+ ", line)]
    assert progress, f"`rollout status --watch` to a pipe printed no progress line:\n{watch}"
    assert "completed" in progress[-1], watch

    compress = next(t for t in operator.transcript if "compress class" in t.splitlines()[0])
    assert re.search(r"^rpi4: .+ \(\d+/\d+\)$", compress, re.MULTILINE), f"no stage line into a pipe:\n{compress}"

    edgefleet = str(BIN / "edgefleet")

    def devices() -> list[dict[str, object]]:
        out = subprocess.run(
            [edgefleet, "device", "list", "--class", "rpi4", "--json"],
            cwd=operator.cwd, env=operator.env, capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        rows: list[dict[str, object]] = json.loads(out.stdout)
        return rows

    deadline = time.monotonic() + 180
    rows = devices()
    while time.monotonic() < deadline and not (
        len(rows) == 25 and all(r["state"] == "online" and r["model_version"] == 1 for r in rows)
    ):
        time.sleep(2)
        rows = devices()
    behind = [
        (r["id"], r["state"], r["model_version"]) for r in rows if r["state"] != "online" or r["model_version"] != 1
    ]
    assert len(rows) == 25, rows
    assert not behind, f"devices not on v1: {behind}\n{operator.background_tails()}"

    metrics_url = f"http://127.0.0.1:{operator.ports[README_METRICS_PORT]}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        metrics = response.read().decode()
    assert 'edgefleet_devices{device_class="rpi4",state="online"} 25.0' in metrics, transcript[-3000:]

    serve_log = next(log for code, _, log in operator.background if "serve" in code).read_text()
    assert re.search(r"\d\d:\d\d:\d\d fleet default: rpi4 \d+/\d+ online", serve_log), serve_log[-2000:]
    simulate_log = next(log for code, _, log in operator.background if "simulate" in code).read_text()
    assert "connected" in simulate_log, simulate_log[-2000:]
    print(transcript)  # the closing note's transcript: pytest -s shows it
