"""edgefleet.compression: turn a trained torch model (or an ONNX file) plus data into a compressed ONNX artifact.

    from edgefleet.compression import Recipe, compress, load_recipe
    from edgefleet.compression.examples import train_example

    model, task = train_example("digits")
    onnx_bytes, report = compress(model, load_recipe("compression/examples/full-chain.toml"), task)
    print(report.result.size_ratio, report.result.accuracy_delta)

Importing this package imports torch; the controller imports it lazily, and the agent never does.
"""

from __future__ import annotations

from edgefleet.compression.errors import (
    CompressionError,
    DataError,
    ExportError,
    ModelLoadError,
    RecipeError,
    UnsupportedLayerError,
    VerificationError,
)
from edgefleet.compression.measure import Measurement, measure
from edgefleet.compression.pipeline import CompressionReport, StepReport, apply_steps, compress, initial_state
from edgefleet.compression.recipe import (
    ActivationPruneConfig,
    DistillConfig,
    FactorizeConfig,
    FineTune,
    Fp16Config,
    MagnitudePruneConfig,
    PassConfig,
    PassKind,
    QatConfig,
    QuantizeDynamicConfig,
    QuantizeStaticConfig,
    Recipe,
    StructuredPruneConfig,
    load_recipe,
    parse_recipe,
)
from edgefleet.compression.registry import ModelState, Pass, PassContext, PassOutput, default_registry, make_pass
from edgefleet.compression.sources import load_exported_program, load_factory, load_onnx, write_atomic
from edgefleet.compression.task import Task, load_npz

__all__ = [
    "ActivationPruneConfig",
    "CompressionError",
    "CompressionReport",
    "DataError",
    "DistillConfig",
    "ExportError",
    "FactorizeConfig",
    "FineTune",
    "Fp16Config",
    "MagnitudePruneConfig",
    "Measurement",
    "ModelLoadError",
    "ModelState",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassKind",
    "PassOutput",
    "QatConfig",
    "QuantizeDynamicConfig",
    "QuantizeStaticConfig",
    "Recipe",
    "RecipeError",
    "StepReport",
    "StructuredPruneConfig",
    "Task",
    "UnsupportedLayerError",
    "VerificationError",
    "apply_steps",
    "compress",
    "default_registry",
    "initial_state",
    "load_exported_program",
    "load_factory",
    "load_npz",
    "load_onnx",
    "load_recipe",
    "make_pass",
    "measure",
    "parse_recipe",
    "write_atomic",
]
