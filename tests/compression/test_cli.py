"""`edgefleet compress run`: the example, bring-your-own model and ONNX forms, and bad input exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.compression import initial_state
from edgefleet.controller.cli.main import app

if TYPE_CHECKING:
    from conftest import Trained

WIDE = {"COLUMNS": "200"}  # rich wraps tables to the terminal; a wide one keeps names whole

FACTORY = """
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
"""


@pytest.fixture
def data_npz(tmp_path: Path, digits: Trained) -> Path:
    path = tmp_path / "data.npz"
    task = digits.task
    np.savez(path, x_train=task.x_train, y_train=task.y_train, x_val=task.x_val, y_val=task.y_val)
    return path


def _recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(body, encoding="utf-8")
    return path


def test_example_run_prints_tables_and_writes_files(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, '[[passes]]\nkind = "quantize_static"\ncalibration_samples = 64\n')
    out = tmp_path / "vib.onnx"
    result = CliRunner(env=WIDE).invoke(
        app,
        [
            "compress",
            "run",
            "--example",
            "vibration",
            "--train-epochs",
            "1",
            "--recipe",
            str(recipe),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "x smaller" in result.output
    assert "quantize_static" in result.output
    assert out.stat().st_size > 0
    report = json.loads((tmp_path / "vib.report.json").read_text(encoding="utf-8"))
    assert report["result"]["peak_rss_bytes"] > 0
    assert report["task"] == "vibration"


def test_bring_your_own_factory_with_json_output(
    tmp_path: Path, data_npz: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "byo_model.py").write_text(FACTORY, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _recipe(tmp_path, '[[passes]]\nkind = "quantize_dynamic"\n')
    args = ["compress", "run", "--model", "byo_model:build", "--data", str(data_npz), "--recipe", str(recipe)]
    result = CliRunner(env=WIDE).invoke(app, [*args, "--out", str(tmp_path / "m.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source"] == "torch"
    assert report["result"]["size_ratio"] > 2


def test_onnx_only_model(tmp_path: Path, data_npz: Path, digits: Trained) -> None:
    model = tmp_path / "in.onnx"
    model.write_bytes(initial_state(digits.model, digits.task).onnx)
    fp16 = _recipe(tmp_path, '[[passes]]\nkind = "fp16"\n')
    base = ["compress", "run", "--onnx", str(model), "--data", str(data_npz), "--out", str(tmp_path / "o.onnx")]
    result = CliRunner(env=WIDE).invoke(app, [*base, "--recipe", str(fp16)])
    assert result.exit_code == 0, result.output
    assert "ONNX-only model" in result.output
    distill = _recipe(tmp_path, '[[passes]]\nkind = "distill"\n')
    (tmp_path / "o.onnx").unlink()
    result = CliRunner(env=WIDE).invoke(app, [*base, "--recipe", str(distill)])
    assert result.exit_code == 1
    assert "error: recipe 'recipe': passes distill need a torch model" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists()  # nothing written on failure


def test_bad_input_exit_codes(tmp_path: Path, data_npz: Path) -> None:
    runner = CliRunner(env=WIDE)
    nan = tmp_path / "nan.npz"
    x = np.full((4, 1, 16, 16), np.nan, np.float32)
    np.savez(nan, x_train=x, y_train=np.arange(4) % 2, x_val=x, y_val=np.arange(4) % 2)
    result = runner.invoke(app, ["compress", "run", "--model", "no_such_module:build", "--data", str(nan)])
    assert result.exit_code == 1
    assert "NaN" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["compress", "run", "--model", "no_such_module:build", "--data", str(data_npz)])
    assert result.exit_code == 1
    assert "cannot be imported" in result.output
    bad = _recipe(tmp_path, '[[passes]]\nkind = "prune_structured"\namount = 2\n')
    result = runner.invoke(app, ["compress", "run", "--example", "digits", "--recipe", str(bad)])
    assert result.exit_code == 1
    assert "amount" in result.output
    assert runner.invoke(app, ["compress", "run"]).exit_code == 2
    both = ["compress", "run", "--example", "digits", "--onnx", "x.onnx"]
    assert runner.invoke(app, both).exit_code == 2
    assert runner.invoke(app, ["compress", "run", "--onnx", "x.onnx"]).exit_code == 2  # --data missing
    assert runner.invoke(app, ["compress", "run", "--example", "mnist"]).exit_code == 2
