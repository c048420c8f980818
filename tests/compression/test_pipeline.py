"""The whole chain on both examples, step-by-step reuse, ONNX-only sources, and passes that break the model."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import pytest
import torch
from torch import nn

from edgefleet.compression import (
    DataError,
    DistillConfig,
    ExportError,
    FactorizeConfig,
    FineTune,
    Fp16Config,
    MagnitudePruneConfig,
    ModelLoadError,
    ModelState,
    PassContext,
    PassKind,
    PassOutput,
    QuantizeStaticConfig,
    Recipe,
    RecipeError,
    StructuredPruneConfig,
    Task,
    VerificationError,
    apply_steps,
    compress,
    default_registry,
    initial_state,
    load_exported_program,
    write_atomic,
)
from edgefleet.compression.pipeline import RECIPE_METADATA_KEY

if TYPE_CHECKING:
    from conftest import Trained

QUICK = FineTune(epochs=1, time_budget_s=20)
CHAIN = Recipe(
    name="tiny-chain",
    passes=[
        DistillConfig(width=0.75, epochs=1, lr=5e-3, batch_size=32),
        StructuredPruneConfig(amount=0.25, finetune=QUICK),
        FactorizeConfig(energy=None, target_ratio=0.6, min_params=500, finetune=QUICK),
        QuantizeStaticConfig(calibration_samples=64),
    ],
)


@pytest.mark.parametrize("example", ["digits", "vibration"])
def test_full_chain_runs_end_to_end(example: str, request: pytest.FixtureRequest) -> None:
    trained: Trained = request.getfixturevalue(example)
    data, report = compress(trained.model, CHAIN, trained.task, latency_runs=20, rss=False)
    assert [s.kind for s in report.steps] == [p.kind for p in CHAIN.passes]
    assert report.result.size_ratio is not None
    assert report.result.size_ratio > 2
    assert report.result.file_bytes == len(data)
    assert report.steps[1].parameters < report.steps[0].parameters  # pruning removed channels
    stored = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert Recipe.model_validate_json(stored[RECIPE_METADATA_KEY]) == CHAIN  # the recipe travels with the artifact
    assert report.source == "torch"
    assert report.model_dump_json()  # the report is JSON


def test_steps_can_resume_from_a_kept_prefix(digits: Trained) -> None:
    state = initial_state(digits.model, digits.task)
    ctx = PassContext(teacher=state.module)
    prefix = Recipe(passes=CHAIN.passes[1:2])
    ((_, pruned),) = list(apply_steps(state, prefix, digits.task, ctx=ctx))
    assert state.module is digits.model  # the input state is never changed
    assert pruned.module is not None
    kept = sum(p.numel() for p in pruned.module.parameters())
    suffix = Recipe(passes=[QuantizeStaticConfig(calibration_samples=32)])
    for _ in range(2):  # two different suffixes from the same kept intermediate model
        ((report, final),) = list(apply_steps(pruned, suffix, digits.task, ctx=ctx))
        assert final.module is None
        assert report.kind == PassKind.QUANTIZE_STATIC
    assert sum(p.numel() for p in pruned.module.parameters()) == kept


def test_onnx_only_model_takes_only_onnx_passes(digits: Trained) -> None:
    fp32 = initial_state(digits.model, digits.task).onnx
    data, report = compress(fp32, Recipe(passes=[Fp16Config()]), digits.task, latency_runs=10, rss=False)
    assert report.source == "onnx"
    assert "ONNX-only model" in report.notes[0]
    assert len(data) < 0.6 * len(fp32)
    with pytest.raises(RecipeError, match="prune_structured need a torch model"):
        compress(fp32, Recipe(passes=[StructuredPruneConfig()]), digits.task)


def test_a_pass_that_breaks_the_model_names_the_layer(digits: Trained) -> None:
    class Poison:
        def __init__(self, config: MagnitudePruneConfig) -> None:
            self.config = config

        def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
            assert state.module is not None
            model = copy.deepcopy(state.module)
            with torch.no_grad():
                model[4].weight[0, 0, 0, 0] = float("nan")  # the strided conv
            return PassOutput(module=model)

    registry = default_registry()
    registry[PassKind.PRUNE_MAGNITUDE] = Poison  # type: ignore[assignment]
    state = initial_state(digits.model, digits.task)
    with pytest.raises(VerificationError, match="first at layer '4'") as info:
        list(apply_steps(state, Recipe(passes=[MagnitudePruneConfig()]), digits.task, registry=registry))
    assert info.value.layer == "4"


def test_model_that_will_not_export(digits: Trained) -> None:
    class Eigen(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(x.shape[0], 16, 16)
            return torch.linalg.eigh(flat @ flat.transpose(1, 2))[0][:, :10]

    with pytest.raises(ExportError, match="Eigen will not export to ONNX"):
        compress(Eigen(), Recipe(passes=[Fp16Config()]), digits.task, rss=False)


def test_data_that_does_not_fit_the_model(digits: Trained, vibration: Trained) -> None:
    with pytest.raises(DataError, match="the model rejects inputs of shape"):
        compress(digits.model, Recipe(), vibration.task, rss=False)
    wrong_classes = Task.from_arrays(
        "d", x_train=digits.task.x_train, y_train=digits.task.y_train % 3, x_val=digits.task.x_val,
        y_val=digits.task.y_val % 3,
    )  # fmt: skip
    with pytest.raises(DataError, match=r"expected logits of shape \(2, 3\)"):
        compress(digits.model, Recipe(), wrong_classes, rss=False)


def test_atomic_write_never_leaves_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "model.onnx"
    write_atomic(target, b"first")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode a plain open() would give


def test_torch_export_program_file(tmp_path: Path, digits: Trained) -> None:
    example = torch.from_numpy(digits.task.x_train[:2])
    path = tmp_path / "model.pt2"
    batch = {0: torch.export.Dim("batch", min=1, max=1024)}
    torch.export.save(torch.export.export(copy.deepcopy(digits.model), (example,), dynamic_shapes=(batch,)), str(path))
    model = load_exported_program(path)
    _, report = compress(model, Recipe(passes=[QuantizeStaticConfig(calibration_samples=32)]), digits.task, rss=False)
    assert report.source == "torch"
    assert report.result.size_ratio is not None
    assert report.result.size_ratio > 2
    with pytest.raises(ModelLoadError, match=r"not a loadable torch\.export program"):
        load_exported_program(tmp_path / "missing.pt2")


def test_torch_export_program_with_a_fixed_batch_is_a_data_error(tmp_path: Path, digits: Trained) -> None:
    path = tmp_path / "fixed.pt2"
    example = torch.from_numpy(digits.task.x_train[:1])
    torch.export.save(torch.export.export(copy.deepcopy(digits.model), (example,)), str(path))
    with pytest.raises(DataError, match="export it with a dynamic batch"):
        compress(load_exported_program(path), Recipe(), digits.task, rss=False)
