"""What a model computes in, and how far another CPU may move its outputs: the numerics behind validation tolerances.

`numeric_kind` tells fp32, fp16 and int8 graphs apart; for int8, `output_steps` reads each output's quantization
step from the graph and `shifted` makes the copy in which every layer requantizes a whole step off (the worst a
kernel that rounds differently can do); `tolerances_for` turns those into the manifest's `Tolerances`. Used by
controller/artifacts/validation_set.py, which picks the samples and checks the tolerances before they go out.

    kind = numeric_kind(model)                       # an onnx.ModelProto
    tol = tolerances_for(kind, scale=9.5, step=output_steps(model).get("logits"), drift=0.28)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np

from edgefleet.protocols.manifest import Tolerances

__all__ = ["NumericKind", "numeric_kind", "output_steps", "shifted", "tolerances_for"]

_INT8_MIN_STEPS = 4.0  # output quantization steps an int8 tolerance is never below
_INT8_SLACK = 1.5  # tolerance = this many times the largest output move of the shifted runs
_INT8_MIN_CLOSE = 0.75  # 12 of 16 samples: the rest may meet a CPU's kernel defect (AVX2 int16 saturation)
_INT8_TOP1 = 0.9


class NumericKind(StrEnum):
    """How a model computes, which decides how far another CPU's outputs may drift from the controller's."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


_INT8_OPS = frozenset(
    {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm"}
)
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def numeric_kind(model: Any) -> NumericKind:
    """INT8 when the graph has integer kernels (QLinear*, QuantizeLinear, ...), FP16 when it holds float16 tensors."""
    graph = model.graph
    ops = {node.op_type for node in graph.node}
    if ops & _INT8_OPS or any(op.startswith("QLinear") for op in ops):
        return NumericKind.INT8
    typed = [*graph.input, *graph.output, *graph.value_info]
    if (
        any(v.type.tensor_type.elem_type == _FLOAT16 for v in typed)
        or any(init.data_type == _FLOAT16 for init in graph.initializer)
        or any(a.name == "to" and a.i == _FLOAT16 for node in graph.node for a in node.attribute)
    ):
        return NumericKind.FP16
    return NumericKind.FP32


def tolerances_for(kind: NumericKind, scale: float, *, step: float | None = None, drift: float = 0.0) -> Tolerances:
    """Tolerances for outputs whose largest magnitude is `scale` (logits ~10, probabilities <= 1).

    The device's rule is |got - want| <= abs_tol + rel_tol * |want| on every element; rounding errors grow with the
    size of the values summed, not with each element, so abs_tol is a fraction of the largest output (never less
    than that fraction of 1, which covers probabilities and small logits alike):
    - fp32: the protocol's defaults (1e-3 + 1e-2 relative) at scale 1. Another CPU sums in another order: errors
      of ~1e-5 of the scale for a few thousand terms, two orders of magnitude inside. Every argmax must match
      (samples near a tie are not picked, see `build_validation`).
    - fp16: half precision rounds at ~1e-3 per operation; 1e-2 of the scale and 2e-2 relative leave room for a few
      dozen roundings in a row; 5% of the argmaxes may flip.
    - int8: the outputs sit on a grid of `step` (the output's quantization scale, see `output_steps`; without one,
      scale / 127). Another CPU's kernels requantize each layer with other rounding (ARM dot products, x86 VNNI
      or the float fake-quant path: 0 to 1 output steps apart on the test models); `drift` is how far the output
      moves when every layer requantizes a whole step off (`shifted`): 7 steps for a two-layer MLP, 16 after a
      softmax. abs_tol = max(4 steps, 1.5 * drift), no relative part (the error is in steps, whatever the
      value). An argmax that swaps with a class whose expected value is within two tolerances (`top1_margin`)
      still agrees, and 90% must agree. 75% of the samples must be close: x86 CPUs without VNNI (AVX2) sum
      u8 x s8 products in pairs into int16, which saturates for 8-bit weights (not for `reduce_range` 7-bit
      ones) and moved 7% of the samples by 3 to 21 output steps on a Haswell CPU; another model's samples, or
      swapped labels, are tens of steps off on every sample.
    """
    unit = max(1.0, float(scale))
    if kind is NumericKind.INT8:
        grid = float(step) if step is not None and step > 0 else unit / 127
        abs_tol = max(_INT8_MIN_STEPS * grid, _INT8_SLACK * float(drift))
        return Tolerances(
            abs_tol=abs_tol, rel_tol=0.0, top1_agreement=_INT8_TOP1, min_close=_INT8_MIN_CLOSE, top1_margin=2 * abs_tol
        )
    if kind is NumericKind.FP16:
        return Tolerances(abs_tol=1e-2 * unit, rel_tol=2e-2, top1_agreement=0.95)
    return Tolerances(abs_tol=1e-3 * unit, rel_tol=1e-2, top1_agreement=1.0)


def output_steps(model: Any) -> dict[str, float]:
    """The quantization step of each graph output that comes off an int8 grid: the scale of the DequantizeLinear
    that makes it (through reshapes and the like; the largest scale when it has one per channel), 1.0 for an
    output that is itself integer (QuantizeLinear, QLinear*). Outputs computed in float after the last
    dequantization (dynamic quantization's MatMulInteger + Mul + Add, a float Softmax) are not listed."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    scales = _float_initializers(graph)
    steps: dict[str, float] = {}
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = producer.get(node.input[0])
        if node is None:
            continue
        if node.op_type == "DequantizeLinear" and len(node.input) > 1 and node.input[1] in scales:
            steps[output.name] = float(np.max(np.abs(scales[node.input[1]])))
        elif node.op_type == "QuantizeLinear" or node.op_type.startswith("QLinear") or node.op_type == "QGemm":
            steps[output.name] = 1.0
    return steps


def shifted(model: Any, steps: int) -> Any | None:
    """A copy of the int8 model in which every op that quantizes an activation (QuantizeLinear, the QLinear ops)
    writes it `steps` grid steps off, while the ops that read it keep the old zero point: every layer's
    requantization is off by that many steps, the worst a kernel that rounds differently can do, and the error
    carries through the layers that follow. None when the graph quantizes no activation this way (dynamic
    quantization computes its scales and zero points at run time)."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    targets: list[tuple[int, int]] = []  # (node index, index of its output zero point input)
    for index, node in enumerate(graph.node):
        if node.op_type == "QuantizeLinear" and node.input and node.input[0] not in initializers:
            targets.append((index, 2))
        elif node.op_type in _QLINEAR_OUTPUT_SCALE:
            targets.append((index, _QLINEAR_OUTPUT_SCALE[node.op_type] + 1))
    from onnx import numpy_helper

    zero_points = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    copy = type(model)()
    copy.CopyFrom(model)
    moved = 0
    for index, position in targets:
        node = copy.graph.node[index]
        zero = zero_points.get(node.input[position]) if len(node.input) > position else None
        if zero is None or zero.dtype.kind not in "iu":
            continue
        info = np.iinfo(zero.dtype)
        off = np.clip(zero.astype(np.int64) + steps, info.min, info.max).astype(zero.dtype)
        name = f"{node.output[0]}_zero_point_shifted_{steps}"
        copy.graph.initializer.append(numpy_helper.from_array(off, name))
        node.input[position] = name
        moved += 1
    return copy if moved else None


_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
# QOperator-format ops: the input that holds the scale of their (requantized) output.
_QLINEAR_OUTPUT_SCALE = {
    "QLinearConv": 6,
    "QLinearMatMul": 6,
    "QLinearAdd": 6,
    "QLinearMul": 6,
    "QGemm": 7,
    "QLinearSigmoid": 3,
    "QLinearLeakyRelu": 3,
    "QLinearSoftmax": 3,
    "QLinearAveragePool": 3,
    "QLinearGlobalAveragePool": 3,
}


def _float_initializers(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer if init.data_type in _FLOAT_TYPES}
    return {name: a for name, a in arrays.items() if a.size and np.isfinite(a).all()}


_FLOAT_TYPES = frozenset({1, _FLOAT16, 11})  # FLOAT, FLOAT16, DOUBLE
