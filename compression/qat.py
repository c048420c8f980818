"""Quantization-aware fine-tuning: train with int8 fake-quant in the forward pass, export it as a QDQ ONNX graph.

The fake-quant uses the same affine mapping as onnxruntime's static quantizer (see quantize.py's docstring): weights
int8 symmetric per output channel; the inputs and outputs of every Conv/Linear uint8 asymmetric per tensor, ranges
calibrated on training samples before training. Gradients pass straight through the rounding
(torch's fake_quantize ops).
BatchNorm is folded into the preceding convolution first (torch.fx), so the weights that are quantized are the ones
that run. The exporter writes QuantizeLinear/DequantizeLinear pairs; weight QuantizeLinear nodes on constants are
then folded into int8 initializers, so the file stores int8 weights like onnxruntime's own QDQ output.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils import parametrize

from edgefleet.compression.errors import RecipeError
from edgefleet.compression.export import export_onnx
from edgefleet.compression.recipe import QatConfig
from edgefleet.compression.registry import ModelState, PassContext, PassOutput
from edgefleet.compression.task import Task
from edgefleet.compression.training import fit

__all__ = ["QatPass", "fold_weight_quantizers"]

log = logging.getLogger(__name__)
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 fake quantization of a weight (a parametrization).

    `levels` is 127 (8-bit) or 63 (7-bit, `reduce_range`: see quantize.py on why x86 without VNNI needs it). The
    quantized values stay within [-levels, levels], so the int8 range given to the op never clips them.
    """

    def __init__(self, *, levels: int = 63) -> None:
        super().__init__()
        self.levels = levels
        self.frozen: torch.Tensor | None = None

    def freeze(self, weight: torch.Tensor) -> None:
        """Fix the scales (before export), so the exporter sees constants and the weights fold to int8."""
        self.frozen = self.scale(weight)

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.detach().reshape(weight.shape[0], -1)
        return (flat.abs().amax(dim=1) / self.levels).clamp_min(1e-8).float()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scale(weight) if self.frozen is None else self.frozen
        zero = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -128, 127)


class ActivationFakeQuant:
    """uint8 asymmetric fake quantization of an activation, its range calibrated once on training samples.

    Used as a forward pre-hook (a layer's input) and as a forward hook (its output): with both, the exported graph
    has DQ -> Conv -> Q around every layer, the pattern onnxruntime fuses into an integer convolution.
    """

    def __init__(self) -> None:
        self.low, self.high = 0.0, 0.0
        self.calibrating = True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.low = min(self.low, float(x.min()))
            self.high = max(self.high, float(x.max()))
            return x
        scale = max((self.high - self.low) / 255.0, 1e-8)
        zero = int(np.clip(round(-self.low / scale), 0, 255))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    def pre_hook(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (self.quantize(inputs[0]), *inputs[1:])

    def hook(self, _module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return self.quantize(output)


def _fold_batchnorm(model: nn.Module) -> tuple[nn.Module, str | None]:
    try:
        return fuse(model.eval()), None
    except Exception as exc:  # noqa: BLE001 - fx tracing fails on data-dependent control flow
        return model, f"BatchNorm not folded (model is not fx-traceable: {type(exc).__name__}); BN runs in float"


def fold_weight_quantizers(data: bytes) -> bytes:
    """Replace QuantizeLinear nodes whose inputs are all constants by their int8/uint8 result (an initializer)."""
    model = onnx.load_from_string(data)
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    keep, added = [], []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and all(name in consts for name in node.input):
            x, scale, zero = (consts[name] for name in node.input[:3])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and x.ndim > 1:
                shape = [1] * x.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            info = np.iinfo(zero.dtype)
            q = np.clip(np.rint(x / scale) + zero.astype(np.int32), info.min, info.max).astype(zero.dtype)
            added.append(numpy_helper.from_array(q, name=node.output[0]))
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(added)
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used and i.name not in {o.name for o in graph.output}]
    for init in unused:
        graph.initializer.remove(init)
    live = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(live)
    folded: bytes = model.SerializeToString()
    return folded


class QatPass:
    """Fold BN, calibrate input ranges, fine-tune with fake-quant, export QDQ with int8 weights."""

    def __init__(self, config: QatConfig) -> None:
        self.config = config

    def apply(self, state: ModelState, task: Task, ctx: PassContext) -> PassOutput:
        if state.module is None:
            raise RecipeError("qat needs a torch model; this model is ONNX only (use quantize_static)")
        cfg = self.config
        model, note = _fold_batchnorm(copy.deepcopy(state.module))
        hooks: list[ActivationFakeQuant] = []
        quantizers: list[tuple[nn.Module, WeightFakeQuant]] = []
        for module in model.modules():
            if isinstance(module, LAYERS):
                quantizers.append((module, WeightFakeQuant(levels=63 if cfg.reduce_range else 127)))
                parametrize.register_parametrization(module, "weight", quantizers[-1][1])
                before, after = ActivationFakeQuant(), ActivationFakeQuant()
                module.register_forward_pre_hook(before.pre_hook)
                module.register_forward_hook(after.hook)
                hooks.extend((before, after))
        with torch.no_grad():
            model.eval()(torch.from_numpy(task.calibration(cfg.calibration_samples, seed=ctx.seed)))
        for hook in hooks:
            hook.calibrating = False
        result = fit(
            model, task, epochs=cfg.epochs, time_budget_s=cfg.time_budget_s, lr=cfg.lr,
            batch_size=cfg.batch_size, seed=ctx.seed, clock=ctx.clock,
        )  # fmt: skip
        with torch.no_grad():
            for module, quantizer in quantizers:
                # max|fake_quant(w)| == max|w| per channel, so the frozen scales are the trained ones.
                quantizer.freeze(torch.as_tensor(module.weight))
        data = fold_weight_quantizers(export_onnx(model.eval(), task.x_val))
        onnx.checker.check_model(onnx.load_from_string(data))
        notes = [
            f"QAT: {len(hooks) // 2} layers fake-quantized, fine-tuned {result.epochs} epochs in {result.seconds:.1f} s"
        ]
        if note:
            notes.append(note)
        return PassOutput(onnx=data, notes=tuple(notes))
