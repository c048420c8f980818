"""The pass plug-in interface: a `Pass` protocol, the state passes hand on, and an enum-keyed registry with a factory.

Torch-level passes take `state.module` and return a new module (never changing the one they were given, so a caller
such as the planner can keep intermediate models and reuse a shared recipe prefix). ONNX-level passes take
`state.onnx` (and, for QAT, the module) and return the final ONNX bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from edgefleet.compression.recipe import PassConfig, PassKind
from edgefleet.compression.task import Task

__all__ = ["ModelState", "Pass", "PassContext", "PassFactory", "PassOutput", "default_registry", "make_pass"]


@dataclass(frozen=True)
class ModelState:
    """A model between passes: the torch module (None for ONNX-only models) and its verified ONNX export."""

    module: nn.Module | None
    onnx: bytes


@dataclass(frozen=True)
class PassContext:
    """What passes may use besides the model: the recipe's input model as teacher, a seed, a clock."""

    teacher: nn.Module | None = None
    seed: int = 0
    clock: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class PassOutput:
    """A pass's result: a new torch module or final ONNX bytes, plus notes for the report."""

    module: nn.Module | None = None
    onnx: bytes | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


class Pass(Protocol):
    """One compression technique, configured by its pydantic config."""

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput: ...


PassFactory = Callable[[PassConfig], Pass]


def default_registry() -> dict[PassKind, PassFactory]:
    """A fresh registry of the built-in passes; callers may add or replace entries in their copy."""
    from edgefleet.compression.distill import DistillPass
    from edgefleet.compression.factorize import FactorizePass
    from edgefleet.compression.prune import ActivationPrunePass, MagnitudePrunePass, StructuredPrunePass
    from edgefleet.compression.qat import QatPass
    from edgefleet.compression.quantize import Fp16Pass, QuantizeDynamicPass, QuantizeStaticPass

    return {
        PassKind.PRUNE_MAGNITUDE: MagnitudePrunePass,  # type: ignore[dict-item]
        PassKind.PRUNE_STRUCTURED: StructuredPrunePass,  # type: ignore[dict-item]
        PassKind.PRUNE_ACTIVATION: ActivationPrunePass,  # type: ignore[dict-item]
        PassKind.DISTILL: DistillPass,  # type: ignore[dict-item]
        PassKind.FACTORIZE: FactorizePass,  # type: ignore[dict-item]
        PassKind.QUANTIZE_STATIC: QuantizeStaticPass,  # type: ignore[dict-item]
        PassKind.QUANTIZE_DYNAMIC: QuantizeDynamicPass,  # type: ignore[dict-item]
        PassKind.FP16: Fp16Pass,  # type: ignore[dict-item]
        PassKind.QAT: QatPass,  # type: ignore[dict-item]
    }


def make_pass(config: PassConfig, *, registry: dict[PassKind, PassFactory] | None = None) -> Pass:
    """Build the pass for `config` from `registry` (the built-ins by default)."""
    return (registry or default_registry())[config.kind](config)
