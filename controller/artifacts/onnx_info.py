"""Read what a manifest needs from an ONNX file: inputs, outputs and opset (onnx imported lazily)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgefleet.controller.errors import StoreError
from edgefleet.protocols.manifest import TensorSpec

__all__ = ["OnnxInfo", "read_onnx_info"]

_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}
MAX_ONNX_BYTES = 512 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class OnnxInfo:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int


def _spec(value: Any, path: Path) -> TensorSpec:
    tensor = value.type.tensor_type
    dtype = _DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise StoreError(f"{path}: tensor {value.name!r} has element type {tensor.elem_type}, not supported")
    dims: list[int | str | None] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(str(dim.dim_param))
        else:
            dims.append(None)
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(dims))  # type: ignore[arg-type]


def read_onnx_info(path: Path) -> OnnxInfo:
    """Load and check an ONNX model file; errors name the file."""
    import onnx

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise StoreError(f"cannot read ONNX file {path} ({exc.strerror or exc})") from exc
    if size > MAX_ONNX_BYTES:
        raise StoreError(f"{path} is {size} bytes, more than {MAX_ONNX_BYTES}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise StoreError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v, path) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, path) for v in model.graph.output)
    opset = max((o.version for o in model.opset_import if o.domain in {"", "ai.onnx"}), default=0)
    if not inputs or not outputs:
        raise StoreError(f"{path}: the model has no inputs or no outputs")
    return OnnxInfo(inputs=inputs, outputs=outputs, opset=int(opset))
