"""Where `edgefleet compress run` and `compress plan` get a model and its data: a shipped example, a torch model
(`module:factory` or a `torch.export` program file) with an `.npz`, or an ONNX file with an `.npz`.

torch is imported inside `load_model_source` only, so importing this module stays cheap.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from torch import nn

    from edgefleet.compression.task import Task

__all__ = ["DataOpt", "ExampleName", "ExampleOpt", "ModelOpt", "OnnxOpt", "load_model_source"]


class ExampleName(StrEnum):
    digits = "digits"
    vibration = "vibration"


# The source options, shared by every command that takes a model.
ExampleOpt = Annotated[ExampleName | None, typer.Option(help="a shipped example (trained first, < 1 min)")]
ModelOpt = Annotated[str | None, typer.Option(help="your model: 'package.module:factory' or a torch.export .pt2 file")]
OnnxOpt = Annotated[Path | None, typer.Option("--onnx", help="your ONNX model (only quantize/fp16 passes apply)")]
DataOpt = Annotated[Path | None, typer.Option(help=".npz with x_train, y_train, x_val, y_val")]


def load_model_source(
    example: ExampleName | None, model: str | None, onnx_file: Path | None, data: Path | None, epochs: int | None
) -> tuple[nn.Module | bytes, Task]:
    """The model and task the options name; a missing `--data` is a usage error (exit 2)."""
    from edgefleet.compression import load_exported_program, load_factory, load_npz, load_onnx
    from edgefleet.compression.examples import train_example

    if example is not None:
        typer.echo(f"training the {example.value} example (under a minute on two cores)...", err=True)
        return train_example(example.value, epochs=epochs)
    if data is None:
        raise typer.BadParameter("--data data.npz is required with --model or --onnx", param_hint="--data")
    task = load_npz(data)
    if onnx_file is not None:
        return load_onnx(onnx_file), task
    if model is None:
        raise typer.BadParameter("give --example, --model or --onnx", param_hint="--model")
    if model.endswith((".pt2", ".pt")) or Path(model).is_file():
        return load_exported_program(model), task
    return load_factory(model), task
