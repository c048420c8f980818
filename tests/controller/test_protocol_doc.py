"""docs/protocol.md's "Playing a device with mosquitto_pub and mosquitto_sub", steps 1 and 2, run as written.

The shell blocks of step 1 (listen for commands, with a persistent session and a last will) and step 2 (say hello:
a retained online status and a birth) are read from the doc and run in one bash, as the doc says (the listener in the
background), against a Mosquitto of the test's own (anonymous, on a free port: `-h localhost` becomes
`-h 127.0.0.1 -p PORT`), with a controller serving fleet `plant-a` where `cam-17` is registered. The controller must
see cam-17 online (the doc's payloads are what it accepts), then offline once the listener is killed (the doc's will
is one the controller applies). Later steps need a deploy's job id and hashes typed in by hand; they are not run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_for

from edgefleet.controller.broker.mosquitto import ManagedMosquitto, find_mosquitto, free_port
from edgefleet.controller.config import load_settings
from edgefleet.controller.errors import BrokerError
from edgefleet.controller.service.app import ControllerApp

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
SECTION = "## Playing a device with mosquitto_pub and mosquitto_sub"

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.skipif(find_mosquitto() is None, reason="the mosquitto binary is missing (Debian's `mosquitto`)"),
    pytest.mark.skipif(
        shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None,
        reason="mosquitto_pub/mosquitto_sub are missing (Debian's `mosquitto-clients`)",
    ),
]


def steps(text: str) -> list[str]:
    """The `sh` blocks of the section, in order, de-indented."""
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```", section, re.DOTALL | re.MULTILINE)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ManagedMosquitto]:
    managed = ManagedMosquitto(tmp_path / "broker", port=free_port())
    try:
        managed.start()
    except BrokerError as exc:
        pytest.skip(f"could not start a mosquitto of the test's own: {exc}")
    try:
        yield managed
    finally:
        managed.stop()


def test_the_doc_names_the_steps_it_walks_through() -> None:
    blocks = steps(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    assert "mosquitto_sub" in blocks[0]
    assert "--will-topic" in blocks[0]
    assert "/birth" in blocks[1]


def test_playing_a_device_says_hello_as_written(cli, broker: ManagedMosquitto, profiles: Path, tmp_path: Path) -> None:
    cli.env.update(
        EDGEFLEET_FLEET="plant-a", EDGEFLEET_MQTT_HOST=broker.host, EDGEFLEET_MQTT_PORT=str(broker.port),
        EDGEFLEET_MQTT_CLIENT_ID="ctl-doc",
    )  # fmt: skip
    cli.ok("init")
    cli.ok("class", "add", "rpi4", "--profile", str(profiles / "rpi4.toml"))
    cli.ok("device", "register", "--class", "rpi4", "--id", "cam-17")
    settings = load_settings(flags={"home": cli.home}, env=cli.env)
    app = ControllerApp(dataclasses.replace(settings, metrics_port=free_port(), flush_interval_s=0.1))
    listen, hello = (
        b.replace("-h localhost", f"-h {broker.host} -p {broker.port}") for b in steps(DOC.read_text())[:2]
    )
    # One shell, as the doc says: step 1's listener in the background (its T and NOW are step 2's), then step 2.
    script = f"{listen.rstrip()} &\nsleep 1.5\n{hello}\n"
    app.start()
    log = (tmp_path / "listen.log").open("wb")
    shell = subprocess.Popen(
        ["bash", "-c", script], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        assert shell.wait(timeout=30) == 0, _tail(tmp_path)
        assert wait_for(lambda: cli.json("device", "show", "cam-17")["state"] == "online", timeout=15, step=0.3), (
            app.service.stats()
        )
        shown = cli.json("device", "show", "cam-17")
        assert shown["fleet"] == "plant-a"
        assert shown["class"] == "rpi4"
        os.killpg(shell.pid, signal.SIGKILL)  # the listener dies without a DISCONNECT: the broker sends its will
        assert wait_for(lambda: cli.json("device", "show", "cam-17")["state"] == "offline", timeout=15, step=0.3), (
            "the doc's last will was not applied"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        log.close()
        app.stop()


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "listen.log").read_text(errors="replace")[-2000:]
