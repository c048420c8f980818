"""`edgefleet compress plan`: what an operator sees for a good plan, an impossible profile and a broken profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from plankit import Tiny
from typer.testing import CliRunner

from edgefleet.controller.cli.main import app

PROFILE = """[profile]
name = "cli-class"
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
def inputs(tiny: Tiny, tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny.onnx)
    data = tmp_path / "tiny.npz"
    task = tiny.task
    np.savez(data, x_train=task.x_train, y_train=task.y_train, x_val=task.x_val, y_val=task.y_val)
    return model, data


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["compress", "plan", *args])
    return result.exit_code, result.output


def test_plan_prints_json_writes_the_artifact_and_the_plot(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = inputs
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE.format(storage=model.stat().st_size // 2), encoding="utf-8")
    out = tmp_path / "planned.onnx"
    code, output = _invoke(
        ["--onnx", str(model), "--data", str(data), "--profile", str(profile), "--out", str(out), "--json",
         "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert code == 0, output
    report = json.loads(output[output.index("{") :])
    assert report["feasible"] is True
    assert report["binding"] == "storage"
    assert report["chosen"]["recipe"]["passes"][-1]["kind"] in {"quantize_static", "quantize_dynamic"}
    assert "artifact" not in report
    assert out.stat().st_size <= model.stat().st_size // 2
    assert (tmp_path / "planned.front.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_tables_name_the_recipe_and_the_binding_constraint(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = inputs
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE.format(storage=model.stat().st_size // 2), encoding="utf-8")
    code, output = _invoke(["--onnx", str(model), "--data", str(data), "--profile", str(profile), "--no-cache"])
    assert code == 0, output
    assert "chosen recipe: quantize" in output
    assert "binding constraint: storage" in output
    assert "Pareto front" in output


def test_impossible_profile_reports_the_closest_candidate(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = inputs
    profile = tmp_path / "tiny-flash.toml"
    profile.write_text(PROFILE.format(storage=1024), encoding="utf-8")
    code, output = _invoke(["--onnx", str(model), "--data", str(data), "--profile", str(profile), "--no-cache"])
    assert code == 1
    assert "nothing fits" in output
    assert "closest candidate" in output
    assert "misses storage" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        (PROFILE.format(storage=1000).replace("threads = 1\n", ""), "threads"),
        (PROFILE.format(storage=1000).replace("fp32_conv = 2.0", 'fp32_conv = "fast"'), "fp32_conv"),
        (PROFILE.format(storage=-5), "storage_budget_bytes"),
    ],
)
def test_bad_profile_names_the_field_and_the_file(
    inputs: tuple[Path, Path], tmp_path: Path, broken: str, field: str
) -> None:
    model, data = inputs
    profile = tmp_path / "broken.toml"
    profile.write_text(broken, encoding="utf-8")
    code, output = _invoke(["--onnx", str(model), "--data", str(data), "--profile", str(profile), "--no-cache"])
    assert code == 1
    assert field in output
    assert "broken.toml" in output
    assert "Traceback" not in output


def test_missing_profile_file_is_one_clear_error(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = inputs
    code, output = _invoke(["--onnx", str(model), "--data", str(data), "--profile", str(tmp_path / "nope.toml")])
    assert code == 1
    assert "nope.toml" in output
    assert "Traceback" not in output


def test_the_cli_module_does_not_load_torch() -> None:
    code = "import sys, edgefleet.controller.cli.main; assert 'torch' not in sys.modules, 'torch loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
