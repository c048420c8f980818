"""ONNX-level quantization passes through onnxruntime's quantizer, and fp16 weights.

The affine int8 mapping used by onnxruntime's QuantizeLinear/DequantizeLinear (and by our QAT fake-quant, qat.py):

    q = clip(round_half_to_even(x / s) + z, q_min, q_max)        x̂ = (q - z) · s

- weights: int8, symmetric, one scale per output channel: z = 0, s_c = max|W_c| / 127 (a range of [-127, 127] so
  that negating a weight never overflows); with `reduce_range` 7 bits, s_c = max|W_c| / 63, so that on x86 CPUs
  without VNNI the uint8 x int8 products summed in pairs into int16 (vpmaddubsw) cannot saturate;
- activations: uint8, asymmetric, one scale per tensor from calibrated [min, max] (widened to include 0 so that zero
  padding and ReLU zeros are exact): s = (max - min) / 255, z = round(-min / s), clipped to [0, 255];
- bias: int32 with s_bias = s_input · s_weight and z = 0 (onnxruntime's quantizer does this step).
Values outside the calibrated range clip to q_min/q_max; that clipping error is what the calibration method trades
off against rounding error: MinMax never clips calibration data, Percentile clips the rarest outliers (99.999th),
Entropy picks the range minimising the KL divergence between the float and quantized histograms.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgefleet.compression.errors import CompressionError, RecipeError
from edgefleet.compression.export import INPUT_NAME, onnx_parameter_counts, run_onnx
from edgefleet.compression.recipe import Fp16Config, QuantizeDynamicConfig, QuantizeStaticConfig
from edgefleet.compression.registry import ModelState, PassContext, PassOutput
from edgefleet.compression.task import Task

__all__ = ["Fp16Pass", "QuantizeDynamicPass", "QuantizeStaticPass", "fp16_weights", "static_int8"]

log = logging.getLogger(__name__)

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds calibration batches to onnxruntime's calibrator."""

    def __init__(self, name: str, x: npt.NDArray[np.float32], *, batch: int = 32) -> None:
        self._batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        return next(self._batches, None)


def _input_name(data: bytes) -> str:
    graph = onnx.load_from_string(data).graph
    inits = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    return names[0] if names else INPUT_NAME


def _preprocess(data: bytes, path: Path) -> None:
    """onnxruntime's recommended pre-processing (shape inference, graph optimisation) before quantizing."""
    source = path.with_suffix(".raw.onnx")
    source.write_bytes(data)
    # Symbolic shape inference is only needed for dynamic shapes inside the graph; ours has a dynamic batch only.
    quant_pre_process(str(source), str(path), skip_symbolic_shape=True)


def static_int8(data: bytes, calibration: npt.NDArray[np.float32], config: QuantizeStaticConfig) -> bytes:
    """QDQ static int8 through onnxruntime: per-channel int8 weights, calibrated activations (see module docstring)."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        try:
            _preprocess(data, source)
            # The calibrators print progress to stdout, which would corrupt a CLI's --json output.
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(source),
                    str(target),
                    _Reader(_input_name(data), calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=config.per_channel,
                    reduce_range=config.reduce_range,
                    activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=_METHODS[config.calibration],
                    extra_options={"WeightSymmetric": True},
                )
        except Exception as exc:
            raise CompressionError(f"static int8 quantization failed: {exc}") from exc
        return target.read_bytes()


def _accuracy(data: bytes, task: Task) -> float:
    return float(np.mean(run_onnx(data, task.x_val).argmax(axis=1) == task.y_val))


class QuantizeStaticPass:
    """Static int8; if the accuracy drop exceeds `max_accuracy_drop` and `qat` is set, fall back to QAT."""

    def __init__(self, config: QuantizeStaticConfig) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        cfg = self.config
        sample = task.calibration(cfg.calibration_samples, seed=ctx.seed)
        quantized = static_int8(state.onnx, sample, cfg)
        notes = [f"static int8 QDQ, {cfg.calibration} calibration on {len(sample)} training samples"]
        if cfg.max_accuracy_drop is None:
            return PassOutput(onnx=quantized, notes=tuple(notes))
        base, got = _accuracy(state.onnx, task), _accuracy(quantized, task)
        notes.append(f"post-training accuracy {base:.4f} -> {got:.4f}")
        if base - got <= cfg.max_accuracy_drop:
            return PassOutput(onnx=quantized, notes=tuple(notes))
        if cfg.qat is None or state.module is None:
            notes.append(f"drop exceeds {cfg.max_accuracy_drop}; no QAT fallback configured or no torch model")
            return PassOutput(onnx=quantized, notes=tuple(notes))
        from edgefleet.compression.qat import QatPass

        qat = QatPass(cfg.qat).apply(state, task, ctx)
        assert qat.onnx is not None  # noqa: S101 - QatPass always returns ONNX
        qat_accuracy = _accuracy(qat.onnx, task)
        notes.extend(qat.notes)
        notes.append(f"drop exceeded {cfg.max_accuracy_drop}: QAT fallback reached {qat_accuracy:.4f}")
        return PassOutput(onnx=qat.onnx if qat_accuracy >= got else quantized, notes=tuple(notes))


class QuantizeDynamicPass:
    """Dynamic int8 of MatMul/Gemm weights; says so when the model's weights mostly live elsewhere (convolutions)."""

    def __init__(self, config: QuantizeDynamicConfig) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
            source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            try:
                _preprocess(state.onnx, source)
                quantize_dynamic(
                    str(source),
                    str(target),
                    op_types_to_quantize=list(self.config.op_types),
                    per_channel=self.config.per_channel,
                    weight_type=QuantType.QInt8,
                )
            except Exception as exc:
                raise CompressionError(f"dynamic int8 quantization failed: {exc}") from exc
            quantized = target.read_bytes()
        notes = [f"dynamic int8 of {', '.join(self.config.op_types)}"]
        if len(quantized) > 0.8 * len(state.onnx):
            notes.append(
                f"only {1 - len(quantized) / len(state.onnx):.0%} smaller: most weights are not in "
                f"{'/'.join(self.config.op_types)} layers; use quantize_static for convolutional models"
            )
        return PassOutput(onnx=quantized, notes=tuple(notes))


def fp16_weights(data: bytes, *, min_elements: int = 16) -> tuple[bytes, int]:
    """Store float32 initializers of at least `min_elements` as float16, each behind a Cast back to float32.

    Compute stays float32 (onnxruntime folds the Casts when it loads the model), so every CPU runs it; the file and
    the transfer halve. Tensors that would overflow float16 stay float32. Returns (model bytes, tensors converted).
    """
    model = onnx.load_from_string(data)
    graph = model.graph
    kept, casts, converted = [], [], 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.data_type != TensorProto.FLOAT or array.size < min_elements:
            kept.append(init)
            continue
        half = array.astype(np.float16)
        if not np.isfinite(half).all():
            kept.append(init)
            continue
        kept.append(numpy_helper.from_array(half, name=f"{init.name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{init.name}__fp16"], [init.name], to=TensorProto.FLOAT))
        converted += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString(), converted


class Fp16Pass:
    """Half-size weights; see `fp16_weights`."""

    def __init__(self, config: Fp16Config) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        data, converted = fp16_weights(state.onnx, min_elements=self.config.min_elements)
        if converted == 0:
            raise RecipeError("fp16: the model has no float32 weights to convert (is it already quantized?)")
        params = onnx_parameter_counts(onnx.load_from_string(data))[0]
        return PassOutput(onnx=data, notes=(f"{converted} weight tensors ({params} values) stored as float16",))
