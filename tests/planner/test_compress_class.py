"""`edgefleet compress class`: the planner's pick for a registered class becomes its next signed artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from plankit import Tiny
from typer.testing import CliRunner

from edgefleet.controller.cli.main import app

PROFILE = """[profile]
name = "{name}"
storage_budget_bytes = {storage}
ram_budget_bytes = 1_000_000_000
latency_budget_ms = 50.0
threads = 1
int8_dot_product = true
max_accuracy_drop = 0.05
[profile.reference_ms]
fp32_conv = 2.0
fp32_matmul = 2.0
int8_conv = 2.0
int8_matmul = 2.0
"""


@pytest.fixture
def home(tiny: Tiny, tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny.onnx)
    data = tmp_path / "tiny.npz"
    task = tiny.task
    np.savez(data, x_train=task.x_train, y_train=task.y_train, x_val=task.x_val, y_val=task.y_val)
    env = {"EDGEFLEET_HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    _ok(env, "init")
    for name, storage in (("half", model.stat().st_size // 2), ("tiny", 1000)):
        profile = tmp_path / f"{name}.toml"
        profile.write_text(PROFILE.format(name=name, storage=storage), encoding="utf-8")
        _ok(env, "class", "add", name, "--profile", str(profile))
    _ok(env, "model", "add", "tiny", "--onnx", str(model))
    return env, model, data


def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output


def _ok(env: dict[str, str], *args: str) -> str:
    code, output = _run(env, *args)
    assert code == 0, output
    return output


def test_the_pick_is_stored_signed_with_its_recipe(home: tuple[dict[str, str], Path, Path]) -> None:
    env, model, data = home
    out = _ok(env, "compress", "class", "tiny", "--class", "half", "--onnx", str(model), "--data", str(data), "--json")
    row = json.loads(out[out.index("{") :])
    assert row["version"] == 1
    assert row["binding"] == "storage"
    assert row["size"] <= model.stat().st_size // 2
    shown = json.loads(_ok(env, "artifact", "show", str(row["id"]), "--json"))
    text = json.dumps(shown)
    assert "quantize" in text  # the recipe travels with the artifact
    assert "predicted_p95_ms" in text
    assert shown["validation_samples"] == 16  # from the data's validation split, checked on the devices
    assert shown["manifest"]["tolerances"]["top1_agreement"] < 1.0  # the int8 pick gets int8 tolerances


def test_nothing_fits_stores_nothing_and_says_by_how_much(home: tuple[dict[str, str], Path, Path]) -> None:
    env, model, data = home
    code, output = _run(env, "compress", "class", "tiny", "--class", "tiny", "--onnx", str(model), "--data", str(data))
    assert code == 1
    assert "nothing fits class tiny" in output
    assert "storage" in output
    assert "Traceback" not in output
    listed = json.loads(_ok(env, "artifact", "list", "--json"))
    assert listed == []


def test_unknown_model_or_class_is_a_clear_error(home: tuple[dict[str, str], Path, Path]) -> None:
    env, model, data = home
    for args in (("nope", "--class", "half"), ("tiny", "--class", "nope")):
        code, output = _run(env, "compress", "class", *args, "--onnx", str(model), "--data", str(data))
        assert code == 1, output
        assert "error:" in output
        assert "nope" in output
