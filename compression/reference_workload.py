"""Builds the reference workload: four small ONNX models whose times on a CPU describe how fast it runs models.

A device's speed is a fact about the device, measured on a workload that never changes: a small convolution net and
a small matrix-multiply net, each in fp32 and in static int8 (QDQ, onnxruntime's quantizer). The int8 pair is there
so that a CPU without int8 dot-product instructions (ARMv8.0, x86 without VNNI) is measured on its real int8 path,
not assumed to be some fixed factor slower. The agent ships the built files (`agent/workload/`) and times them
(`edgefleet-agent speed-factor` on a device, the planner and the simulator on their own host; agent/speed.py).

Regenerate after changing anything here (the shipped files are checked against this builder by a test)::

    python -m edgefleet.compression.reference_workload agent/workload

The weights and the calibration data come from a fixed seed; opset 13 and IR version 8 keep the files loadable by
every onnxruntime a profile may name (1.17 and later).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["WORKLOADS", "build_workload", "workload_inputs"]

OPSET = 13
IR_VERSION = 8
_CONV_INPUT = (1, 8, 32, 32)
_MATMUL_INPUT = (16, 256)
WORKLOADS = ("fp32_conv", "fp32_matmul", "int8_conv", "int8_matmul")
"""The names the profiles' `[profile.reference_ms]` table uses, in this order."""


def workload_inputs(name: str, *, seed: int = 1) -> dict[str, np.ndarray]:
    """The input a workload is timed on (the agent makes the same from the shape in workload.json)."""
    shape = _CONV_INPUT if name.endswith("conv") else _MATMUL_INPUT
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _conv_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Three 3x3 convolutions (8 -> 16 -> 16 -> 16 channels, 32x32), pooled into a 10-way linear head."""
    inits, nodes, last = [], [], "x"
    for i, (cin, cout) in enumerate([(8, 16), (16, 16), (16, 16)]):
        w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        inits += [_init(f"w{i}", w), _init(f"b{i}", rng.standard_normal(cout) * 0.1)]
        nodes.append(helper.make_node("Conv", [last, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        last = f"r{i}"
    inits += [_init("wh", rng.standard_normal((16, 10)) * 0.3), _init("bh", np.zeros(10))]
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wh", "bh"], ["y"]),
    ]
    return _model("fp32_conv", nodes, inits, _CONV_INPUT, (1, 10))


def _matmul_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Three 256x256 matrix multiplies with bias and ReLU on 16 rows (a small MLP or one transformer MLP block)."""
    inits, nodes, last = [], [], "x"
    for i in range(3):
        w = rng.standard_normal((256, 256)) * np.sqrt(2.0 / 256)
        inits += [_init(f"w{i}", w), _init(f"b{i}", rng.standard_normal(256) * 0.1)]
        nodes += [
            helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        last = f"r{i}"
    nodes[-1] = helper.make_node("Relu", ["a2"], ["y"])
    return _model("fp32_matmul", nodes, inits, _MATMUL_INPUT, (16, 256))


def _model(
    name: str, nodes: list[Any], inits: list[Any], in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgefleet")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol: 16 seeded batches of the workload's input."""

    def __init__(self, name: str) -> None:
        self._batches = iter([workload_inputs(name, seed=100 + i) for i in range(16)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantized(fp32: onnx.ModelProto, name: str) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        onnx.save(fp32, src)
        quantize_static(
            str(src),
            str(dst),
            _Calibration(name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        model = onnx.load(dst)
    model.ir_version = IR_VERSION
    model.graph.name = name.replace("fp32", "int8")
    return model


def build_workload(out_dir: Path) -> dict[str, str]:
    """Write the four models and workload.json (input shapes, sha256 of each file) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261203)
    conv, matmul = _conv_model(rng), _matmul_model(rng)
    models = {
        "fp32_conv": conv,
        "fp32_matmul": matmul,
        "int8_conv": _quantized(conv, "fp32_conv"),
        "int8_matmul": _quantized(matmul, "fp32_matmul"),
    }
    digests = {}
    for name, model in models.items():
        data = model.SerializeToString()
        (out_dir / f"{name}.onnx").write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    index = {
        name: {
            "file": f"{name}.onnx",
            "sha256": digests[name],
            "input": list(_CONV_INPUT if name.endswith("conv") else _MATMUL_INPUT),
        }
        for name in WORKLOADS
    }
    (out_dir / "workload.json").write_text(json.dumps({"version": 1, "models": index}, indent=2) + "\n")
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    for name, digest in build_workload(args.out_dir).items():
        sys.stdout.write(f"{name}: {digest}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
