"""Recipes are validated before any work: order rules, impossible values, files, ONNX-only sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.compression import (
    DistillConfig,
    FactorizeConfig,
    Fp16Config,
    QuantizeStaticConfig,
    Recipe,
    RecipeError,
    load_recipe,
    parse_recipe,
)
from edgefleet.compression.examples import EXAMPLE_RECIPE


def test_shipped_recipe_is_the_full_chain() -> None:
    recipe = load_recipe(EXAMPLE_RECIPE)
    assert [p.kind.value for p in recipe.passes] == ["distill", "prune_structured", "factorize", "quantize_static"]


def test_quantization_must_be_last() -> None:
    with pytest.raises(RecipeError, match=r"pass 1 \(quantize_static\) .* must be the last pass; move distill"):
        parse_recipe({"passes": [{"kind": "quantize_static"}, {"kind": "distill"}]})


@pytest.mark.parametrize(
    ("passes", "field"),
    [
        ([{"kind": "prune_structured", "amount": 1.5}], "amount"),
        ([{"kind": "distill", "width": 0}], "width"),
        ([{"kind": "distill", "temperature": -1}], "temperature"),
        ([{"kind": "quantize_static", "calibration": "magic"}], "calibration"),
        ([{"kind": "factorize", "energy": 0.9, "target_ratio": 0.5}], "exactly one"),
        ([{"kind": "no_such_pass"}], "kind"),
        ([{"kind": "prune_magnitude", "amout": 0.5}], "amout"),
    ],
)
def test_impossible_values_name_the_field(passes: list[dict[str, object]], field: str) -> None:
    with pytest.raises(RecipeError, match=field):
        parse_recipe({"passes": passes}, source="r.toml")


def test_recipe_files(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('name = "x"\n[[passes]]\nkind = "fp16"\n', encoding="utf-8")
    assert load_recipe(good).passes == [Fp16Config()]
    broken = tmp_path / "broken.toml"
    broken.write_text("[[passes]\nkind=", encoding="utf-8")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.toml")


def test_recipe_round_trips_as_json() -> None:
    recipe = Recipe(name="r", passes=[DistillConfig(width=0.5), FactorizeConfig(energy=0.8), QuantizeStaticConfig()])
    assert Recipe.model_validate_json(recipe.model_dump_json()) == recipe


def test_onnx_only_source_allows_only_onnx_passes() -> None:
    Recipe(passes=[Fp16Config()]).check_source(has_torch_model=False)
    with pytest.raises(RecipeError, match="distill need a torch model"):
        Recipe(passes=[DistillConfig(), QuantizeStaticConfig()]).check_source(has_torch_model=False)
