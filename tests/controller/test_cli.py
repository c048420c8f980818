"""`edgefleet` verbs end to end (in-process, temporary home), including what bad input looks like."""

from __future__ import annotations

import csv
import sqlite3
import stat
from pathlib import Path

import pytest

from edgefleet.controller.broker.mosquitto import free_port
from edgefleet.controller.config import load_settings
from edgefleet.controller.credentials import verify_secret
from edgefleet.controller.errors import ConfigError


def test_init_is_idempotent_and_keeps_the_key_private(cli) -> None:
    first = cli.json("init")
    second = cli.json("init")
    assert first["key_id"] == second["key_id"]
    key = Path(first["key_path"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Path(first["public_key_path"]).read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert cli.json("fleet", "list")[0]["name"] == "default"


def test_fleets_and_classes(ready, profiles: Path) -> None:
    ready.ok("fleet", "create", "plant-b")
    assert [f["name"] for f in ready.json("fleet", "list")] == ["default", "plant-b"]
    classes = ready.json("class", "list")
    assert [c["name"] for c in classes] == ["rpi4", "x86-gateway"]
    shown = ready.json("class", "show", "rpi4")
    assert shown["profile"]["threads"] == 4
    ready.ok("class", "add", "pi-zero", "--profile", str(profiles / "rpi4.toml"))
    assert ready.json("class", "show", "pi-zero")["profile"]["name"] == "pi-zero"
    assert "rpi4" in ready.ok("class", "list")


def test_device_register_forms_list_and_show(ready, tmp_path: Path) -> None:
    out = ready.ok("device", "register", "--class", "rpi4", "--id", "pi-a")
    password = out.splitlines()[1].split("\t")[1]
    assert verify_secret(password, _hash(ready, "pi-a"))
    made = ready.json("device", "register", "--class", "rpi4", "--count", "3", "--prefix", "cam")
    assert [d["device_id"] for d in made] == ["cam-0001", "cam-0002", "cam-0003"]
    ids = tmp_path / "ids.csv"
    ids.write_text("device_id,site\ngw-1,a\ngw-2,b\n")
    target = tmp_path / "creds.csv"
    ready.ok("device", "register", "--class", "x86-gateway", "--csv", str(ids), "--out", str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    rows = list(csv.DictReader(target.read_text().splitlines()))
    assert [r["device_id"] for r in rows] == ["gw-1", "gw-2"]
    assert all(len(r["password"]) > 30 for r in rows)
    assert len(ready.json("device", "list")) == 6
    assert [d["id"] for d in ready.json("device", "list", "--class", "x86-gateway")] == ["gw-1", "gw-2"]
    assert ready.json("device", "list", "--state", "online") == []
    shown = ready.json("device", "show", "gw-1")
    assert shown["class"] == "x86-gateway"
    assert shown["state"] == "offline"
    assert "gw-2" in ready.ok("device", "list")


def _hash(cli, device_id: str) -> str:
    with sqlite3.connect(cli.home / "registry.db") as conn:
        return str(conn.execute("select credential_hash from devices where id = ?", (device_id,)).fetchone()[0])


def test_models_and_artifacts(ready, tiny_onnx: Path) -> None:
    ready.ok("model", "add", "tiny", "--onnx", str(tiny_onnx))
    assert ready.json("model", "list")[0]["name"] == "tiny"
    first = ready.json("artifact", "add", "tiny", "--class", "rpi4", "--metrics", '{"accuracy": 0.9}')
    second = ready.json("artifact", "add", "tiny", "--class", "rpi4", "--onnx", str(tiny_onnx))
    other = ready.json("artifact", "add", "tiny", "--class", "x86-gateway")
    assert (first["version"], second["version"], other["version"]) == (1, 2, 1)
    assert len(ready.json("artifact", "list", "--class", "rpi4")) == 2
    shown = ready.json("artifact", "show", "rpi4:1")
    assert shown["metrics"] == {"accuracy": 0.9}
    assert shown["stored"] is True
    assert shown["manifest"]["inputs"][0]["name"] == "x"
    assert ready.json("artifact", "show", str(other["id"]))["class"] == "x86-gateway"
    assert "tiny" in ready.ok("artifact", "list")


def test_broker_config_writes_private_files(ready) -> None:
    ready.ok("device", "register", "--class", "rpi4", "--id", "pi-a", "--id", "pi-b")
    files = ready.json("broker", "config")
    assert files["devices"] == 2
    passwd = Path(files["password_file"])
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
    users = [line.split(":", 1)[0] for line in passwd.read_text().splitlines()]
    assert users == ["edgefleet-controller", "edgefleet-cli", "pi-a", "pi-b"]
    config = Path(files["config"]).read_text()
    for line in ("allow_anonymous false", "use_username_as_clientid true", "set_tcp_nodelay true", "persistence true"):
        assert line in config
    queued = next(int(x.split()[1]) for x in config.splitlines() if x.startswith("max_queued_messages"))
    assert queued >= 10_000


def test_bad_input_gives_a_message_and_exit_code_1(ready, tmp_path: Path) -> None:
    cases = [
        (("class", "add", "x", "--profile", str(tmp_path / "missing.toml")), "cannot read profile file"),
        (("device", "register", "--class", "rpi4", "--id", "p-1", "--id", "p-1"), "given twice"),
        (("device", "register", "--class", "nope", "--id", "p-1"), "does not exist"),
        (("device", "register", "--class", "rpi4"), "exactly one of"),
        (("device", "show", "ghost"), "not registered"),
        (("artifact", "show", "rpi4:9"), "does not exist"),
        (("model", "add", "m", "--onnx", "a.onnx", "--example", "digits"), "exactly one of"),
        (("model", "add", "m", "--onnx", str(tmp_path / "nope.onnx")), "nope.onnx"),
        (("device", "list", "--state", "sleepy"), "online or offline"),
    ]
    ready.ok("device", "register", "--class", "rpi4", "--id", "dup-1")
    cases.append((("device", "register", "--class", "rpi4", "--id", "dup-1"), "already registered"))
    for args, message in cases:
        result = ready(*args)
        assert result.exit_code == 1, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_usage_errors_exit_2_and_missing_home_says_init(cli) -> None:
    assert cli("device", "register", "--id", "x").exit_code == 2
    assert cli("no-such-verb").exit_code == 2
    result = cli("device", "list")
    assert result.exit_code == 1
    assert "edgefleet init" in result.output


def test_locked_and_unreachable_databases(ready) -> None:
    blocker = sqlite3.connect(ready.home / "registry.db", timeout=0.1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        result = ready("fleet", "create", "blocked")
    finally:
        blocker.rollback()
        blocker.close()
    assert result.exit_code == 1
    assert "locked" in result.output
    assert [f["name"] for f in ready.json("fleet", "list")] == ["default"]
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    result = ready("--database-url", url, "fleet", "list")
    assert result.exit_code == 1
    assert "cannot use the registry database" in result.output


def test_settings_precedence_flag_env_file(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "edgefleet.toml").write_text('mqtt_host = "file-host"\nmqtt_port = 1111\nfleet = "from-file"\n')
    env = {"EDGEFLEET_HOME": str(home), "EDGEFLEET_MQTT_PORT": "2222", "EDGEFLEET_SHARED_SUBSCRIPTIONS": "yes"}
    settings = load_settings(flags={"fleet": "from-flag"}, env=env)
    assert (settings.mqtt_host, settings.mqtt_port, settings.fleet) == ("file-host", 2222, "from-flag")
    assert settings.shared_subscriptions is True
    assert settings.db_url == f"sqlite:///{home / 'registry.db'}"
    (home / "edgefleet.toml").write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="unknown keys bogus"):
        load_settings(env=env)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env=env, config_file=tmp_path / "none.toml")
    (home / "edgefleet.toml").write_text("")
    with pytest.raises(ConfigError, match="EDGEFLEET_MQTT_PORT"):
        load_settings(env={**env, "EDGEFLEET_MQTT_PORT": "many"})


@pytest.mark.slow
def test_model_add_from_a_shipped_example(ready) -> None:
    pytest.importorskip("torch", reason="the compression engine needs torch")
    result = ready("model", "add", "vib", "--example", "vibration", "--width", "0.25", "--epochs", "1")
    if result.exit_code == 1 and "not available" in result.output:
        pytest.skip(f"compression engine not usable here: {result.output.strip()}")
    assert result.exit_code == 0, result.output
    model = ready.json("model", "list")[0]
    assert model["source"] == "example:vibration"
    assert ready.json("artifact", "add", "vib", "--class", "x86-gateway")["version"] == 1
    assert "training the vibration example" in result.output  # long work says so before it starts
    bad = ready("model", "add", "other", "--example", "nope")
    assert bad.exit_code == 1
    assert "choose one of" in bad.output
    again = ready("model", "add", "vib", "--example", "vibration", "--width", "0.25", "--epochs", "1")
    assert again.exit_code == 1
    assert "model 'vib' already exists" in again.output
    assert "training" not in again.output  # refused before training, not after it


def test_artifact_add_with_validation_samples(ready, tiny_onnx: Path, tmp_path: Path) -> None:
    import numpy as np

    ready.ok("model", "add", "tiny", "--onnx", str(tiny_onnx))
    bare = ready.ok("artifact", "add", "tiny", "--class", "rpi4")
    assert "no validation samples" in bare
    assert ready.json("artifact", "show", "rpi4:1")["validation_samples"] == 0
    good = tmp_path / "val.npz"
    rng = np.random.default_rng(0)
    np.savez(good, x=rng.normal(size=(40, 4)).astype(np.float32), y=rng.integers(0, 3, 40))
    added = ready.json("artifact", "add", "tiny", "--class", "rpi4", "--validation", str(good))
    assert added["validation_samples"] == 16
    assert added["tolerances"]["top1_agreement"] == 1.0
    assert "16 validation samples" in ready.ok("artifact", "add", "tiny", "--class", "rpi4", "--validation", str(good))
    assert ready.json("artifact", "show", "rpi4:3")["validation_samples"] == 16
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=np.ones((10, 64), np.float32))
    text = tmp_path / "text.npz"
    text.write_text("not numpy")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([None, 1], dtype=object))
    cases = [
        (tmp_path / "missing.npz", "cannot read validation data"),
        (text, "is not an .npz file"),
        (pickled, "pickled"),
        (wide, "wants ('N', 4)"),
    ]
    for path, message in cases:
        result = ready("artifact", "add", "tiny", "--class", "rpi4", "--validation", str(path))
        assert result.exit_code == 1, (path, result.output)
        assert message in result.output, (path, result.output)
        assert "Traceback" not in result.output
    assert len(ready.json("artifact", "list", "--class", "rpi4")) == 3  # nothing stored by the failures
    assert ready.json("artifact", "add", "tiny", "--class", "rpi4")["version"] == 4
    assert ready("artifact", "add", "tiny", "--class", "rpi4", "--validation").exit_code == 2  # usage error


def test_help_shows_environment_variables_and_brackets(cli) -> None:
    shown = cli.ok("--help")
    for name in ("EDGEFLEET_HOME", "EDGEFLEET_CONFIG", "EDGEFLEET_MQTT_PORT", "EDGEFLEET_DATABASE_URL"):
        assert name in shown, name
    assert "[policy]" in cli.ok("class", "add", "--help")  # not swallowed as markup
    assert "[policy]" in cli.ok("serve", "--help")


def test_class_add_says_when_the_profile_is_renamed(ready, profiles: Path) -> None:
    said = ready.ok("class", "add", "raspberry", "--profile", str(profiles / "rpi4.toml"))
    assert "the profile calls itself 'rpi4'; here it is class 'raspberry'" in said
    same = ready.ok("class", "add", "rpi4b", "--profile", str(profiles / "rpi4.toml"))
    assert "calls itself 'rpi4'" in same
    assert "calls itself" not in ready.ok("class", "update", "rpi4", "--profile", str(profiles / "rpi4.toml"))


def test_model_samples_writes_labelled_held_out_data(ready, tmp_path: Path) -> None:
    import numpy as np

    out = tmp_path / "val.npz"
    said = ready.ok("model", "samples", "--example", "digits", "--out", str(out))
    assert "--dataset" in said
    with np.load(out) as data:
        assert data["x"].shape[0] == data["y"].shape[0] > 100
    again = ready("model", "samples", "--example", "digits", "--out", str(out))
    assert again.exit_code == 1
    assert "exists already" in again.output
    text = tmp_path / "notes.txt"
    text.write_text("not numpy\n")
    broken = ready("model", "samples", "--data", str(text), "--out", str(tmp_path / "b.npz"))
    assert broken.exit_code == 1
    assert "not an .npz file" in broken.output
    assert not (tmp_path / "b.npz").exists()
    neither = ready("model", "samples", "--out", str(tmp_path / "c.npz"))
    assert neither.exit_code == 1
    assert "exactly one of" in neither.output
