"""Recipes: an ordered list of pass configurations, pure data (pydantic), validated before any work starts.

A recipe is stored with the artifact (as ONNX metadata) and read from TOML::

    name = "full-chain"

    [[passes]]
    kind = "distill"
    width = 0.5

    [[passes]]
    kind = "quantize_static"
    calibration = "minmax"

Order rules (checked by `Recipe` itself): torch-level passes (pruning, distillation, factorization) come first; at most
one ONNX-level quantization pass (static or dynamic int8, fp16 weights, QAT) and it is the last pass, because after it
the model is no longer a float torch model that the other passes could change or calibrate against.
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.compression.errors import RecipeError
from edgefleet.protocols.errors import describe_problems

__all__ = [
    "ActivationPruneConfig",
    "DistillConfig",
    "FactorizeConfig",
    "FineTune",
    "Fp16Config",
    "MagnitudePruneConfig",
    "PassConfig",
    "PassKind",
    "QatConfig",
    "QuantizeDynamicConfig",
    "QuantizeStaticConfig",
    "Recipe",
    "StructuredPruneConfig",
    "load_recipe",
    "parse_recipe",
]

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class PassKind(StrEnum):
    """Every pass the engine knows; the registry maps each to its implementation."""

    PRUNE_MAGNITUDE = "prune_magnitude"
    PRUNE_STRUCTURED = "prune_structured"
    PRUNE_ACTIVATION = "prune_activation"
    DISTILL = "distill"
    FACTORIZE = "factorize"
    QUANTIZE_STATIC = "quantize_static"
    QUANTIZE_DYNAMIC = "quantize_dynamic"
    FP16 = "fp16"
    QAT = "qat"


TORCH_PASSES = frozenset(
    {
        PassKind.PRUNE_MAGNITUDE,
        PassKind.PRUNE_STRUCTURED,
        PassKind.PRUNE_ACTIVATION,
        PassKind.DISTILL,
        PassKind.FACTORIZE,
    }
)
FINAL_PASSES = frozenset({PassKind.QUANTIZE_STATIC, PassKind.QUANTIZE_DYNAMIC, PassKind.FP16, PassKind.QAT})
ONNX_ONLY_PASSES = frozenset({PassKind.QUANTIZE_STATIC, PassKind.QUANTIZE_DYNAMIC, PassKind.FP16})


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FineTune(_Config):
    """A bounded training run after a pass: stops at `epochs` or `time_budget_s`, whichever comes first."""

    epochs: Annotated[int, Field(ge=0, le=1000)] = 3
    time_budget_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    lr: Annotated[float, Field(gt=0, le=1.0)] = 1e-3
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64
    distill: bool = Field(default=True, description="use the recipe's input model as teacher (logit distillation)")
    temperature: Annotated[float, Field(gt=0, le=100)] = 4.0


class MagnitudePruneConfig(_Config):
    """Unstructured L1 pruning (torch.nn.utils.prune), masks made permanent: zeros compress, shapes stay."""

    kind: Literal[PassKind.PRUNE_MAGNITUDE] = PassKind.PRUNE_MAGNITUDE
    amount: Fraction = 0.5
    scope: Literal["global", "layer"] = "global"
    finetune: FineTune | None = FineTune()


class StructuredPruneConfig(_Config):
    """Whole channels/neurons removed by weight magnitude, through Torch-Pruning's dependency graph."""

    kind: Literal[PassKind.PRUNE_STRUCTURED] = PassKind.PRUNE_STRUCTURED
    amount: Fraction = 0.3
    norm: Literal[1, 2] = 1
    global_pruning: bool = False
    round_to: Annotated[int, Field(ge=1, le=256)] | None = None
    finetune: FineTune | None = FineTune()


class ActivationPruneConfig(_Config):
    """Channels that fire least on calibration data removed: APoZ (share of zeros after ReLU) or mean magnitude."""

    kind: Literal[PassKind.PRUNE_ACTIVATION] = PassKind.PRUNE_ACTIVATION
    amount: Fraction = 0.3
    criterion: Literal["apoz", "mean"] = "apoz"
    calibration_samples: Annotated[int, Field(ge=1, le=100_000)] = 256
    finetune: FineTune | None = FineTune()


class DistillConfig(_Config):
    """Train a student (the teacher with `width` of its channels) on logits (KL·T²) and a projected feature (MSE)."""

    kind: Literal[PassKind.DISTILL] = PassKind.DISTILL
    width: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    init: Literal["pruned", "scratch"] = "pruned"
    temperature: Annotated[float, Field(gt=0, le=100)] = 4.0
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.7
    feature_weight: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    epochs: Annotated[int, Field(ge=1, le=1000)] = 10
    time_budget_s: Annotated[float, Field(gt=0, le=86_400)] = 120.0
    lr: Annotated[float, Field(gt=0, le=1.0)] = 2e-3
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64


class FactorizeConfig(_Config):
    """Truncated SVD of Linear layers, Tucker-2 of convolutions; rank by kept energy or by a target size ratio."""

    kind: Literal[PassKind.FACTORIZE] = PassKind.FACTORIZE
    energy: Annotated[float, Field(gt=0.0, le=1.0)] | None = 0.9
    target_ratio: Fraction | None = None
    layers: Literal["linear", "conv", "both"] = "both"
    min_params: Annotated[int, Field(ge=0)] = 2048
    min_saving: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    finetune: FineTune | None = FineTune()

    @model_validator(mode="after")
    def _one_rank_rule(self) -> Self:
        if (self.energy is None) == (self.target_ratio is None):
            raise ValueError("set exactly one of `energy` (kept singular-value energy) and `target_ratio`")
        return self


class QatConfig(_Config):
    """Quantization-aware fine-tuning: fake-quant in torch (int8 weights per channel, uint8 activations), QDQ export."""

    kind: Literal[PassKind.QAT] = PassKind.QAT
    epochs: Annotated[int, Field(ge=1, le=1000)] = 3
    time_budget_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    lr: Annotated[float, Field(gt=0, le=1.0)] = 2e-4
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64
    calibration_samples: Annotated[int, Field(ge=1, le=100_000)] = 256
    reduce_range: bool = Field(default=True, description="7-bit weights, as for quantize_static")


class QuantizeStaticConfig(_Config):
    """onnxruntime static int8, QDQ format, per-channel weights, activations calibrated on training samples."""

    kind: Literal[PassKind.QUANTIZE_STATIC] = PassKind.QUANTIZE_STATIC
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: Annotated[int, Field(ge=1, le=100_000)] = 256
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    reduce_range: bool = Field(
        default=True,
        description="7-bit weights: x86 CPUs without VNNI multiply uint8 x int8 pairs into int16 sums that saturate at "
        "8-bit weights (seen here: a pruned digits model fell from 99% to 89%); set false for VNNI/ARM dot-product",
    )
    max_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    qat: QatConfig | None = None


class QuantizeDynamicConfig(_Config):
    """onnxruntime dynamic int8 (weights int8, activations quantized at run time) for MatMul/Gemm-heavy models."""

    kind: Literal[PassKind.QUANTIZE_DYNAMIC] = PassKind.QUANTIZE_DYNAMIC
    per_channel: bool = False
    op_types: Annotated[tuple[str, ...], Field(min_length=1)] = ("MatMul", "Gemm")


class Fp16Config(_Config):
    """Weights stored as float16 and cast to float32 when the session loads: half the bytes, same kernels."""

    kind: Literal[PassKind.FP16] = PassKind.FP16
    min_elements: Annotated[int, Field(ge=1)] = 16


PassConfig = Annotated[
    MagnitudePruneConfig
    | StructuredPruneConfig
    | ActivationPruneConfig
    | DistillConfig
    | FactorizeConfig
    | QuantizeStaticConfig
    | QuantizeDynamicConfig
    | Fp16Config
    | QatConfig,
    Field(discriminator="kind"),
]


class Recipe(_Config):
    """An ordered list of passes; the order rules are checked when the recipe is built."""

    name: Annotated[str, Field(min_length=1, max_length=100)] = "recipe"
    passes: Annotated[list[PassConfig], Field(max_length=32)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _order(self) -> Self:
        for index, config in enumerate(self.passes):
            if config.kind in FINAL_PASSES and index != len(self.passes) - 1:
                later = ", ".join(p.kind.value for p in self.passes[index + 1 :])
                raise ValueError(
                    f"pass {index + 1} ({config.kind.value}) quantizes the model and must be the last pass; "
                    f"move {later} before it"
                )
        return self

    def torch_passes(self) -> list[PassConfig]:
        return [p for p in self.passes if p.kind in TORCH_PASSES]

    def check_source(self, *, has_torch_model: bool) -> None:
        """Raise `RecipeError` if a pass needs a torch model and only an ONNX file was given."""
        if has_torch_model:
            return
        needs_torch = [p.kind.value for p in self.passes if p.kind not in ONNX_ONLY_PASSES]
        if needs_torch:
            raise RecipeError(
                f"recipe {self.name!r}: passes {', '.join(needs_torch)} need a torch model, but only an ONNX file "
                f"was given; with ONNX alone only quantize_static, quantize_dynamic and fp16 apply"
            )


def parse_recipe(data: object, *, source: str = "<recipe>") -> Recipe:
    """Validate a parsed document (dict from TOML or JSON); errors name the source and the field."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {describe_problems(exc, subject='recipe')}") from exc


def load_recipe(path: Path | str) -> Recipe:
    """Read a recipe TOML (or JSON) file into a validated `Recipe`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe file ({exc})") from exc
    try:
        if path.suffix == ".json":
            return Recipe.model_validate_json(text)
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
    except ValidationError as exc:
        raise RecipeError(f"{path}: {describe_problems(exc, subject='recipe')}") from exc
    return parse_recipe(data, source=str(path))
