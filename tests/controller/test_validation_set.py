"""Validation samples for the controller's manifests: hostile .npz files, sample building, tolerances that devices
pass (checked with the agent's own validation on other onnxruntime settings, on int8 graphs whose rounding is moved
the way another CPU's kernels move it, and, where qemu is installed, on real AVX2 kernels without VNNI) while
another model's samples or swapped labels fail, and a round trip through a signed manifest. The end-to-end deploys
with a real agent are in tests/agent/test_deploy_validation.py; the device's rule itself in
tests/agent/test_validate.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

from edgefleet.agent.runner import ModelRunner
from edgefleet.agent.validate import to_array, validate_model
from edgefleet.controller.artifacts import validation_set as vs_module
from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.numerics import NumericKind, numeric_kind, output_steps, shifted
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.artifacts.validation_set import ValidationSet, build_validation
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import Artifact
from edgefleet.controller.errors import ControllerError, ValidationDataError
from edgefleet.protocols.manifest import Manifest, TensorSpec, block_digests
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.signing import key_id, public_key_of, verify_manifest

RNG_SEED = 3


def mlp(
    seed: int,
    *,
    features: int = 16,
    hidden: int = 32,
    classes: int = 10,
    softmax: bool = False,
    swap_labels: bool = False,
) -> bytes:
    """features -> hidden -> classes (MatMul/Add/Relu), inputs (batch, features); `swap_labels`: the same network
    with its classes in reverse order (a model trained on relabelled data, or a mixed-up label map)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(features, hidden)) / np.sqrt(features)).astype(np.float32)
    b1 = rng.normal(size=(hidden,)).astype(np.float32) * 0.1
    w2 = (rng.normal(size=(hidden, classes)) * 2 / np.sqrt(hidden)).astype(np.float32)
    b2 = rng.normal(size=(classes,)).astype(np.float32) * 0.1
    if swap_labels:
        w2, b2 = np.ascontiguousarray(w2[:, ::-1]), np.ascontiguousarray(b2[::-1])
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["logits" if softmax else "y"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def data(n: int = 300, features: int = 16, *, seed: int = RNG_SEED) -> ValidationSet:
    rng = np.random.default_rng(seed)
    return ValidationSet.from_arrays(rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, 10, n))


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self._it = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def int8(model: bytes, tmp_path: Path, *, static: bool, softmax: bool = False) -> bytes:
    src, out = tmp_path / "f32.onnx", tmp_path / ("s8.onnx" if static else "d8.onnx")
    src.write_bytes(model)
    if static:
        calib = data(200, seed=11).inputs
        quantize_static(str(src), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True)
    else:
        quantize_dynamic(str(src), str(out))
    return out.read_bytes()


def runner(path: Path, *, threads: int, optimize: bool) -> ModelRunner:
    """The agent's runner on a session configured unlike the controller's (1 thread, all optimizations)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return ModelRunner(path, threads=threads, session=session)


def manifest_with(model: bytes, vset: ValidationSet, *, samples_of: bytes | None = None) -> Manifest:
    """A bare manifest with validation samples (built from `samples_of`, default the model itself)."""
    samples, tolerances = build_validation(samples_of or model, vset)
    now = dt.datetime.now(dt.UTC)
    return Manifest(
        artifact_name="m.test.v1", model_name="m", device_class="test", version=1,
        sha256=hashlib.sha256(model).hexdigest(), size_bytes=len(model), block_size=4096,
        block_sha256=block_digests(model, 4096), created_at=now, expires_at=now + dt.timedelta(days=1),
        key_id="0" * 16, inputs=(TensorSpec(name="x", dtype="float32", shape=("batch", 16)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("batch", 10)),),
        validation_samples=samples, tolerances=tolerances, opset=13, min_onnxruntime_version="1.16",
    )  # fmt: skip


# --- hostile .npz files ----------------------------------------------------------------------------------------


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_load_reads_x_and_y_and_their_aliases(tmp_path: Path) -> None:
    x, y = np.ones((5, 4), dtype=np.float64), np.arange(5, dtype=np.int32)
    loaded = ValidationSet.load(_npz(tmp_path / "a.npz", x=x, y=y))
    assert loaded.inputs.dtype == np.float32
    assert loaded.inputs.shape == (5, 4)
    assert loaded.labels is not None
    assert loaded.labels.tolist() == [0, 1, 2, 3, 4]
    alias = ValidationSet.load(_npz(tmp_path / "b.npz", inputs=x, labels=y))
    assert len(alias) == 5
    assert alias.labels is not None
    unlabelled = ValidationSet.load(_npz(tmp_path / "c.npz", x_val=x))
    assert unlabelled.labels is None
    with pytest.raises(ValueError, match="read-only"):
        loaded.inputs[0, 0] = 2.0
    x32, y64 = np.ones((3, 2), np.float32), np.arange(3)
    ValidationSet.from_arrays(x32, y64)
    assert x32.flags.writeable  # the caller's arrays (a Task's, which torch still uses) are not touched
    assert y64.flags.writeable


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"features": np.ones((3, 4), np.float32)}, "no array named x"),
        ({"x": np.ones((3, 4), np.int64)}, "dtype int64"),
        ({"x": np.ones((3, 4), np.float32), "y": np.ones(3, np.float32)}, "labels: dtype float32"),
        ({"x": np.array([[1.0, np.nan]], np.float32)}, "NaN or infinite"),
        ({"x": np.array([[1.0, np.inf]], np.float32)}, "NaN or infinite"),
        ({"x": np.array([[1e300]], np.float64)}, "NaN or infinite"),
        ({"x": np.ones((3, 4), np.float32), "y": np.arange(4)}, r"expected \(3,\)"),
        ({"x": np.ones((3, 4), np.float32), "y": np.array([0, -1, 2])}, "values must be"),
        ({"x": np.ones((0, 4), np.float32)}, "holds no samples"),
        ({"x": np.ones(4, np.float32)}, "2..8 axes"),
        ({"x": np.ones((1,) * 9, np.float32)}, "2..8 axes"),
        ({"x": np.array(["a", "b"])}, "dtype <U1"),
    ],
)
def test_broken_arrays_are_refused_naming_the_problem(tmp_path: Path, arrays: dict[str, object], match: str) -> None:
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValidationDataError, match=match) as info:
        ValidationSet.load(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ControllerError)


def test_hostile_files_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationDataError, match="cannot read"):
        ValidationSet.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    with pytest.raises(ValidationDataError, match=r"not an \.npz"):
        ValidationSet.load(tmp_path / "text.npz")
    np.save(tmp_path / "plain.npy", np.ones((2, 2), np.float32))
    with pytest.raises(ValidationDataError, match=r"not an \.npz"):
        ValidationSet.load(tmp_path / "plain.npy")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValidationDataError, match="pickled"):
        ValidationSet.load(pickled)
    good = _npz(tmp_path / "good.npz", x=np.ones((40, 4), np.float32))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-60])
    with pytest.raises(ValidationDataError, match=r"truncated\.npz"):
        ValidationSet.load(truncated)
    garbage_member = tmp_path / "garbage.npz"
    with zipfile.ZipFile(garbage_member, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY garbage header")
    with pytest.raises(ValidationDataError, match=r"garbage\.npz"):
        ValidationSet.load(garbage_member)
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros((2000, 100), np.float32))  # 800 kB of zeros in a few kB
    monkeypatch.setattr(vs_module, "MAX_VALIDATION_FILE_BYTES", 100_000)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ValidationDataError, match="unpacks to"):
        ValidationSet.load(bomb)
    with pytest.raises(ValidationDataError, match="more than 100000"):
        ValidationSet.load(_npz(tmp_path / "big.npz", x=np.ones((300, 100), np.float32)))


def test_an_npy_header_claiming_a_huge_array_is_refused_before_numpy_allocates_it(tmp_path: Path) -> None:
    """A few hundred bytes whose header says (65536, 65536, 4) float32: numpy would allocate 64 GiB first."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (65536, 65536, 4), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + b"\0" * 64
    lying = tmp_path / "lying.npz"
    with zipfile.ZipFile(lying, "w") as archive:
        archive.writestr("x.npy", raw)
    with pytest.raises(ValidationDataError, match=r"x\.npy claims shape \(65536, 65536, 4\)"):
        ValidationSet.load(lying)


# --- building samples ------------------------------------------------------------------------------------------


def test_samples_hold_the_models_outputs_deterministically(tmp_path: Path) -> None:
    model, vset = mlp(1), data()
    samples, tol = build_validation(model, vset, count=16, seed=0)
    assert len(samples) == 16
    assert (tol.rel_tol, tol.top1_agreement) == (1e-2, 1.0)
    assert 1e-3 <= tol.abs_tol < 0.1  # 1e-3 of the largest logit
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    labels = vset.labels
    assert labels is not None
    for sample in samples:
        x = to_array(sample.inputs["x"])
        assert x.shape == (1, 16)
        row = int(np.flatnonzero((vset.inputs == x[0]).all(axis=1))[0])
        assert sample.label == int(labels[row])
        np.testing.assert_array_equal(to_array(sample.expected["y"]), session.run(None, {"x": x})[0])
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    assert build_validation(path, vset, count=16, seed=0) == (samples, tol)
    other, _ = build_validation(model, vset, count=16, seed=1)
    assert other != samples
    assert len(build_validation(model, data(5), count=16)[0]) == 5  # fewer samples than asked: all of them


def test_data_that_does_not_fit_the_model_is_refused() -> None:
    with pytest.raises(ValidationDataError, match=r"shape \(64,\).*wants \('N', 16\)"):
        build_validation(mlp(1), data(features=64))
    with pytest.raises(ValidationDataError, match="not an ONNX model"):
        build_validation(b"not a model", data())
    with pytest.raises(ValidationDataError, match=r"1\.\.64"):
        build_validation(mlp(1), data(), count=65)


def test_sample_count_is_cut_to_the_manifest_size_limit() -> None:
    wide = 4096  # 16 KiB of input per sample: 256 KiB hold 15 of them
    samples, _ = build_validation(mlp(1, features=wide, hidden=4), data(40, wide), count=64)
    assert 1 <= len(samples) < 16
    total = sum(len(t.raw()) for s in samples for t in (*s.inputs.values(), *s.expected.values()))
    assert total <= vs_module.MAX_VALIDATION_BYTES
    with pytest.raises(ValidationDataError, match="one input sample is"):
        build_validation(mlp(1, features=20_000, hidden=2), data(2, 20_000))


def test_numeric_kinds_and_their_tolerances(tmp_path: Path) -> None:
    fp32 = mlp(1)
    assert numeric_kind(onnx.load_from_string(fp32)) is NumericKind.FP32
    static, dynamic = int8(fp32, tmp_path, static=True), int8(fp32, tmp_path, static=False)
    assert numeric_kind(onnx.load_from_string(static)) is NumericKind.INT8
    assert numeric_kind(onnx.load_from_string(dynamic)) is NumericKind.INT8
    from edgefleet.compression.quantize import fp16_weights

    half, _ = fp16_weights(fp32)
    assert numeric_kind(onnx.load_from_string(half)) is NumericKind.FP16
    vset = data()
    _, t32 = build_validation(fp32, vset)
    _, t16 = build_validation(half, vset)
    _, t8 = build_validation(static, vset)
    assert t32.abs_tol < t16.abs_tol < t8.abs_tol
    assert t32.rel_tol < t16.rel_tol
    assert t8.top1_agreement < t16.top1_agreement < t32.top1_agreement == 1.0
    # float manifests keep the rule (and the JSON) they had before min_close and top1_margin existed
    assert (t32.min_close, t32.top1_margin, t16.min_close, t16.top1_margin) == (None, None, None, None)
    assert "min_close" not in t32.model_dump(mode="json")
    # int8: counted in steps of the output's grid, with a margin for near-ties and room for a kernel's outliers
    assert t8.rel_tol == 0.0
    assert t8.top1_margin == pytest.approx(2 * t8.abs_tol)
    assert t8.min_close is not None
    assert 0.5 <= t8.min_close < t8.top1_agreement


@pytest.mark.parametrize("softmax", [False, True])
def test_int8_tolerances_are_steps_of_the_output_grid_moved_through_the_layers(tmp_path: Path, softmax: bool) -> None:
    """The output's grid comes from the graph; the tolerance is several steps of it, and covers how far the output
    moves when every layer requantizes one step off (`shifted`), which it measured."""
    model = int8(mlp(1, softmax=softmax), tmp_path, static=True, softmax=softmax)
    graph = onnx.load_from_string(model)
    steps = output_steps(graph)
    assert list(steps) == ["y"]
    step = steps["y"]
    if softmax:
        assert step == pytest.approx(1 / 255)  # probabilities in [0, 1] on an 8-bit grid
    else:
        assert 0.01 < step < 0.1  # logits of about +-5 on an 8-bit grid
    samples, tol = build_validation(model, data())
    assert 4 * step <= tol.abs_tol <= 32 * step
    worst = 0.0
    for steps_off in (1, -1):
        moved = shifted(graph, steps_off)
        assert moved is not None
        session = ort.InferenceSession(moved.SerializeToString(), providers=["CPUExecutionProvider"])
        for sample in samples:
            got = session.run(None, {"x": to_array(sample.inputs["x"])})[0]
            worst = max(worst, float(np.abs(got - to_array(sample.expected["y"])).max()))
    assert step <= worst <= tol.abs_tol  # one step per layer moves the output by more than a step, and is covered
    dynamic = onnx.load_from_string(int8(mlp(1), tmp_path, static=False))
    assert output_steps(dynamic) == {}  # float Mul + Add after MatMulInteger: no grid in the graph
    assert shifted(dynamic, 1) is None  # its activations are quantized at run time
    _, tol_dynamic = build_validation(dynamic.SerializeToString(), data())
    assert tol_dynamic.abs_tol > 0.0


def test_a_half_precision_input_is_carried_as_float16() -> None:
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x32", "w"], ["y"]),
        ],
        "half-input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    samples, tol = build_validation(model.SerializeToString(), data(), count=4)
    assert [s.inputs["x"].dtype for s in samples] == ["float16"] * 4
    assert tol.top1_agreement == 0.95  # fp16 tolerances


KINDS = ["fp32", "int8-static", "int8-dynamic", "int8-softmax"]


def model_of(kind: str, tmp_path: Path, seed: int = 1, *, swap_labels: bool = False) -> bytes:
    softmax = kind == "int8-softmax"
    model = mlp(seed, softmax=softmax, swap_labels=swap_labels)
    if kind.startswith("int8"):
        model = int8(model, tmp_path, static=kind != "int8-dynamic", softmax=softmax)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_devices_on_other_onnxruntime_settings_pass_the_tolerances(tmp_path: Path, kind: str) -> None:
    """The agent's own validation, on sessions unlike the controller's, passes; another model's samples and the
    same model with its labels swapped fail it."""
    model = model_of(kind, tmp_path)
    path = tmp_path / "model.onnx"
    path.write_bytes(model)
    manifest = manifest_with(model, data())
    for threads, optimize in [(1, True), (2, True), (1, False), (3, False)]:
        outcome = validate_model(runner(path, threads=threads, optimize=optimize), manifest, latency_budget_ms=None)
        assert outcome.ok, (threads, optimize, outcome.detail)
    impostor = model_of(kind, tmp_path, seed=2)
    wrong = manifest_with(model, data(), samples_of=impostor)
    outcome = validate_model(runner(path, threads=1, optimize=True), wrong, latency_budget_ms=None)
    assert not outcome.ok, outcome.detail
    swapped = tmp_path / "swapped.onnx"
    swapped.write_bytes(model_of(kind, tmp_path, swap_labels=True))
    for threads, optimize in [(1, True), (1, False)]:
        outcome = validate_model(runner(swapped, threads=threads, optimize=optimize), manifest, latency_budget_ms=None)
        assert not outcome.ok, (threads, optimize, outcome.detail)
        assert outcome.agreement < 0.5


def off_by_one_step(model: bytes, seed: int) -> bytes:
    """Every activation quantization (input, hidden layers, output) rounds one step up, one step down or not at
    all, at random per channel, as kernels that requantize differently do (the readers keep the old grid)."""
    graph = shape_inference.infer_shapes(onnx.load_from_string(model))
    shapes = {v.name: v.type.tensor_type.shape.dim for v in [*graph.graph.value_info, *graph.graph.input]}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    rng = np.random.default_rng(seed)
    for node in graph.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        dims = shapes[node.input[0]]
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        noise = rng.integers(-1, 2, dims[-1].dim_value)
        info = np.iinfo(zero.dtype)
        moved = np.clip(zero.astype(np.int64) + noise, info.min, info.max).astype(zero.dtype)
        name = node.output[0]
        graph.graph.initializer.extend(
            [
                numpy_helper.from_array(np.full(len(noise), scale, np.float32), f"{name}_scale_per_channel"),
                numpy_helper.from_array(moved, f"{name}_zero_point_per_channel"),
            ]
        )
        node.input[1], node.input[2] = f"{name}_scale_per_channel", f"{name}_zero_point_per_channel"
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("axis", len(dims) - 1))
    return graph.SerializeToString()


def grid_moved(model: bytes, factor: float) -> bytes:
    """Every activation's quantization grid scaled by `factor` (1 + 1/254 moves the top of the range half a step)."""
    graph = onnx.load_from_string(model)
    weights = {n.input[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"} & {
        i.name for i in graph.graph.initializer
    }
    scales = {n.input[1] for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights}
    assert scales, "the static int8 model quantizes its activations"
    for init in graph.graph.initializer:
        if init.name in scales:
            moved = numpy_helper.to_array(init) * np.float32(factor)
            init.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), init.name))
    return graph.SerializeToString()


@pytest.mark.parametrize("kind", ["int8-static", "int8-softmax"])
def test_int8_tolerances_cover_another_cpus_rounding_in_every_layer(tmp_path: Path, kind: str) -> None:
    """Another CPU's int8 kernels round each layer differently: emulate it by moving every activation's grid, by
    rounding each channel of every layer a step off at random, and by moving every expected output a step; a
    correct artifact passes all of them, on the fused kernels and on the float fake-quant path."""
    model = model_of(kind, tmp_path)
    manifest = manifest_with(model, data())
    variants = {
        **{f"grid x{f:.4f}": grid_moved(model, f) for f in (1 + 1 / 254, 1 - 1 / 254, 1 + 2 / 254)},
        **{f"off by one, seed {seed}": off_by_one_step(model, seed) for seed in range(4)},
    }
    for name, variant in variants.items():
        path = tmp_path / "variant.onnx"
        path.write_bytes(variant)
        for optimize in (True, False):
            outcome = validate_model(runner(path, threads=1, optimize=optimize), manifest, latency_budget_ms=None)
            assert outcome.ok, (name, optimize, outcome.detail)
    step = output_steps(onnx.load_from_string(model))["y"]
    rng = np.random.default_rng(5)
    noisy = []
    for sample in manifest.validation_samples:
        want = to_array(sample.expected["y"])
        moved = (want + step * rng.choice([-1.0, 1.0], size=want.shape)).astype(want.dtype)
        noisy.append(sample.model_copy(update={"expected": {"y": vs_module._tensor(moved)}}))
    path = tmp_path / "model.onnx"
    path.write_bytes(model)
    noisy_manifest = manifest.model_copy(update={"validation_samples": tuple(noisy)})
    # the float fake-quant path computes what the controller's exact kernels did on every CPU, so here every
    # sample is close: the only difference is the step of noise (the fused kernels of an AVX2 CPU would add theirs)
    outcome = validate_model(runner(path, threads=1, optimize=False), noisy_manifest, latency_budget_ms=None)
    assert outcome.ok, outcome.detail
    assert outcome.close == 1.0
    outcome = validate_model(runner(path, threads=1, optimize=True), noisy_manifest, latency_budget_ms=None)
    assert outcome.ok, outcome.detail


_QEMU = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
_UNDER_QEMU = """
import json, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort
from edgefleet.agent.runner import ModelRunner
from edgefleet.agent.validate import to_array, validate_model
from edgefleet.protocols.manifest import Manifest
folder = Path(sys.argv[1])
report = {}
for case in json.loads((folder / "cases.json").read_text()):
    manifest = Manifest.model_validate_json((folder / case["manifest"]).read_text())
    path = folder / case["model"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    outcome = validate_model(ModelRunner(path, threads=1, session=session), manifest, latency_budget_ms=None)
    x = np.load(folder / "x.npy")
    fast = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    report[case["name"]] = {"ok": outcome.ok, "detail": outcome.detail, "close": outcome.close, "fast": fast.tolist()}
print(json.dumps(report))
"""


@pytest.mark.skipif(_QEMU is None, reason="qemu-x86_64-static is not installed (apt-get install qemu-user-static)")
@pytest.mark.skipif(platform.machine() not in {"x86_64", "AMD64"}, reason="the venv's python must be x86-64")
def test_real_avx2_kernels_without_vnni_pass_a_correct_artifact(tmp_path: Path) -> None:
    """onnxruntime under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512, no VNNI) picks the u8s8 kernels that sum
    products in pairs into int16 and saturate for 8-bit weights: the outputs of some samples move by tens of steps.
    The manifests built on this host still pass there, and swapped labels still fail."""
    assert _QEMU is not None
    vset = data()
    cases = []
    for kind in ("int8-static", "int8-softmax"):
        model = model_of(kind, tmp_path)
        (tmp_path / f"{kind}.onnx").write_bytes(model)
        (tmp_path / f"{kind}-swapped.onnx").write_bytes(model_of(kind, tmp_path, swap_labels=True))
        (tmp_path / f"{kind}.json").write_text(manifest_with(model, vset).model_dump_json())
        cases += [
            {"name": kind, "model": f"{kind}.onnx", "manifest": f"{kind}.json"},
            {"name": f"{kind}-swapped", "model": f"{kind}-swapped.onnx", "manifest": f"{kind}.json"},
        ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    np.save(tmp_path / "x.npy", vset.inputs[:100])
    command = [_QEMU, "-cpu", "Haswell", sys.executable, "-c", _UNDER_QEMU, str(tmp_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("onnxruntime under qemu took over 120 s")
    if done.returncode != 0:
        pytest.skip(f"onnxruntime does not run under qemu here: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    moved = []
    for kind in ("int8-static", "int8-softmax"):
        session = ort.InferenceSession(tmp_path / f"{kind}.onnx", providers=["CPUExecutionProvider"])
        x = vset.inputs[:100]
        here = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
        step = output_steps(onnx.load(tmp_path / f"{kind}.onnx"))["y"]
        moved.append(float(np.abs(np.asarray(report[kind]["fast"]) - here).max() / step))
    if max(moved) <= 1.0:
        pytest.skip(f"qemu's CPU gave the same int8 outputs as this one (at most {max(moved):.1f} steps apart)")
    for kind in ("int8-static", "int8-softmax"):
        assert report[kind]["ok"], (kind, report[kind]["detail"], moved)
        assert not report[f"{kind}-swapped"]["ok"], report[f"{kind}-swapped"]["detail"]


# --- through the catalog: signed manifests -----------------------------------------------------------------------


@pytest.fixture
def catalog(tmp_path: Path, profiles: Path) -> ArtifactCatalog:
    db = Database.open(f"sqlite:///{tmp_path / 'registry.db'}", timeout=1)
    db.migrate()
    registry = Registry(db, actor="tester")
    registry.add_class(load_profile(profiles / "rpi4.toml"))
    registry.add_model("mlp", source="onnx:mlp.onnx", task="classification")
    return ArtifactCatalog(db, store=ArtifactStore(tmp_path / "store"), signing_key=Ed25519PrivateKey.generate())


def test_samples_round_trip_through_a_signed_manifest(catalog: ArtifactCatalog, tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp(1))
    vset = data()
    artifact = catalog.add_from_onnx("mlp", class_name="rpi4", onnx_path=path, validation=vset)
    key = catalog.signing_key
    assert key is not None
    public = public_key_of(key)
    stored = ArtifactCatalog.signed_manifest(catalog.get(artifact.id or 0))
    manifest = verify_manifest(
        stored, trusted_keys={key_id(public): public}, now=artifact.created_at, current_version=0
    )
    samples, tolerances = build_validation(path, vset)
    assert manifest.validation_samples == samples
    assert manifest.tolerances == tolerances
    assert len(samples) == 16
    bare = catalog.add_from_onnx("mlp", class_name="rpi4", onnx_path=path)
    assert ArtifactCatalog.signed_manifest(bare).manifest.validation_samples == ()


def test_validation_data_that_does_not_fit_stores_nothing(catalog: ArtifactCatalog, tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp(1))
    with pytest.raises(ValidationDataError, match="wants"):
        catalog.add_from_onnx("mlp", class_name="rpi4", onnx_path=path, validation=data(features=64))
    assert catalog.list() == []
    assert not list((tmp_path / "store").rglob("*")) or not any(p.is_file() for p in (tmp_path / "store").rglob("*"))
    artifact: Artifact = catalog.add_from_onnx("mlp", class_name="rpi4", onnx_path=path, validation=data())
    assert artifact.version == 1
