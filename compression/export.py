"""ONNX export and the checks run after every pass: `onnx.checker`, then onnxruntime against torch on the same inputs.

Exporter choice: torch 2.13's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`). For these models it
exports in ~0.2 s, folds BatchNorm into convolutions, keeps a dynamic batch axis, honours opset 17 (what the shipped
device profiles run) and turns torch's fake-quantize ops into QuantizeLinear/DequantizeLinear, which QAT needs. The
dynamo exporter (onnxscript) takes seconds per export, upgrades opset 17 to 18 and failed on fake-quant with a dynamic
batch here; it is tried only as a fallback, e.g. for models that tracing cannot capture.
"""

from __future__ import annotations

import io
import logging
import re
import warnings

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from edgefleet.compression.errors import ExportError, VerificationError

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "check_onnx",
    "compact_names",
    "export_onnx",
    "first_nonfinite_module",
    "first_nonfinite_node",
    "onnx_parameter_counts",
    "run_onnx",
    "verify_against_torch",
]

log = logging.getLogger(__name__)
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, sample: npt.NDArray[np.float32], *, opset: int = OPSET) -> bytes:
    """Export `model` (eval mode) to ONNX bytes with a dynamic batch axis; raises `ExportError` naming the cause."""
    model.eval()
    example = torch.from_numpy(np.ascontiguousarray(sample[:1]))
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The exporter's advisory warnings (tracer, deprecation) are not the user's problem.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buffer,  # type: ignore[arg-type]
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        data = buffer.getvalue()
    except Exception as exc:  # noqa: BLE001 - any exporter failure is the same user-facing problem
        log.info("TorchScript export failed (%s); trying the dynamo exporter", exc)
        data = _export_dynamo(model, example, opset=opset, first_error=exc)
    check_onnx(data)
    return data


def _export_dynamo(model: nn.Module, example: torch.Tensor, *, opset: int, first_error: Exception) -> bytes:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=max(opset, 18), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], verbose=False,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        second = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0]
        raise ExportError(
            f"{type(model).__name__} will not export to ONNX: {first_error} (dynamo exporter: {second}). "
            "Make the forward pass traceable (no data-dependent Python control flow)"
        ) from first_error
    if program is None:
        raise ExportError(f"{type(model).__name__} will not export to ONNX: {first_error}") from first_error
    return program.model_proto.SerializeToString()  # type: ignore[no-any-return]


def check_onnx(data: bytes) -> onnx.ModelProto:
    """Parse and run `onnx.checker` on ONNX bytes; raises `ExportError` with the checker's message."""
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"the ONNX graph is invalid: {exc}") from exc
    return model


def session(data: bytes, *, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot load the model: {exc}") from exc


def run_onnx(data: bytes, x: npt.NDArray[np.float32], *, batch_size: int = 256) -> npt.NDArray[np.float32]:
    """Outputs of the ONNX model on `x` (batched)."""
    sess = session(data, threads=2)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32)


def first_nonfinite_node(data: bytes, x: npt.NDArray[np.float32]) -> str | None:
    """The first ONNX node (graph order) whose output holds NaN or infinity on `x`, as `node (op)`."""
    model = onnx.load_from_string(data)
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in known:
                model.graph.output.append(onnx.ValueInfoProto(name=out))
    sess = session(model.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x[:8]}), strict=True))
    for node in model.graph.node:
        for out in node.output:
            value = values.get(out)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                return f"{node.name or out} ({node.op_type})"
    return None


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, x: npt.NDArray[np.float32]) -> str | None:
    """The first leaf module (execution order) whose output holds NaN or infinity on `x`."""
    found: list[str] = []

    def hook(name: str) -> object:
        def inner(_module: nn.Module, _inputs: object, output: object) -> None:
            if not found and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
                found.append(name)

        return inner

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not list(m.children())]
    try:
        model.eval()(torch.from_numpy(x[:8]))
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def verify_against_torch(
    data: bytes, model: nn.Module, x: npt.NDArray[np.float32], *, step: str, atol: float = 1e-3, rtol: float = 1e-3
) -> float:
    """Check that onnxruntime and torch agree on `x`; returns the largest absolute difference.

    Raises `VerificationError` naming the step and, where outputs are not finite, the first broken layer.
    """
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    if not np.isfinite(expected).all():
        layer = first_nonfinite_module(model, x)
        raise VerificationError(f"{step}: torch outputs NaN/inf, first at layer {layer!r}", layer=layer)
    got = run_onnx(data, x)
    if not np.isfinite(got).all():
        layer = first_nonfinite_node(data, x)
        raise VerificationError(f"{step}: onnxruntime outputs NaN/inf, first at node {layer!r}", layer=layer)
    if got.shape != expected.shape:
        raise VerificationError(f"{step}: onnxruntime output shape {got.shape} != torch's {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    scale = float(np.max(np.abs(expected))) or 1.0
    if diff > atol + rtol * scale:
        raise VerificationError(
            f"{step}: onnxruntime and torch disagree by {diff:.3g} (allowed {atol + rtol * scale:.3g}); "
            "the exported graph does not compute what the torch model does"
        )
    return diff


def onnx_parameter_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, non-zero parameters) in the initializers, not counting quantization scales and zero points."""
    qparams = {
        name
        for node in model.graph.node
        if node.op_type in {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
        for name in node.input[1:]
    }
    total = nonzero = 0
    for init in model.graph.initializer:
        if init.name in qparams:
            continue
        array = numpy_helper.to_array(init)
        if array.dtype.kind not in "fiu" or array.ndim == 0 or array.dtype == np.int64:
            continue  # shapes, axes and scalars are not parameters
        total += int(array.size)
        nonzero += int(np.count_nonzero(array))
    return total, nonzero


def compact_names(data: bytes) -> bytes:
    """Rename every internal tensor and node to a short name (`t12`, `n3`), keeping the graph's input/output names.

    Exporters and quantizers name tensors after module paths ("/7/conv1/conv1.1/Conv_output_0_QuantizeLinear_Output");
    in a small int8 model those strings can outweigh the weights. Run after verification, since error messages quote
    the original names.
    """
    model = onnx.load_from_string(data)
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for index, node in enumerate(graph.node):
        node.name = f"n{index}"
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
    compacted: bytes = model.SerializeToString()
    return compacted
