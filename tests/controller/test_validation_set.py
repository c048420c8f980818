"""Validation samples for the controller's manifests: hostile .npz files, sample building, tolerances that devices
pass (checked with the agent's own validation on other onnxruntime settings) and a round trip through a signed
manifest. The end-to-end deploys with a real agent are in tests/agent/test_deploy_validation.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

from edgefleet.agent.runner import ModelRunner
from edgefleet.agent.validate import to_array, validate_model
from edgefleet.controller import validation_set as vs_module
from edgefleet.controller.artifacts import ArtifactCatalog
from edgefleet.controller.db import Database
from edgefleet.controller.errors import ControllerError
from edgefleet.controller.registry import Registry
from edgefleet.controller.store import ArtifactStore
from edgefleet.controller.tables import Artifact
from edgefleet.controller.validation_set import (
    NumericKind,
    ValidationDataError,
    ValidationSet,
    build_validation,
    numeric_kind,
)
from edgefleet.protocols.manifest import Manifest, TensorSpec, block_digests
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.signing import key_id, public_key_of, verify_manifest

RNG_SEED = 3


def mlp(seed: int, *, features: int = 16, hidden: int = 32, classes: int = 10, softmax: bool = False) -> bytes:
    """features -> hidden -> classes (MatMul/Add/Relu), inputs (batch, features)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.normal(size=(features, hidden)) / np.sqrt(features)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(hidden,)).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array((rng.normal(size=(hidden, classes)) * 2 / np.sqrt(hidden)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32) * 0.1, "b2"),
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
    assert t32.rel_tol < t16.rel_tol < t8.rel_tol
    assert t8.top1_agreement < t16.top1_agreement < t32.top1_agreement == 1.0


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


@pytest.mark.parametrize("kind", ["fp32", "int8-static", "int8-dynamic", "int8-softmax"])
def test_devices_on_other_onnxruntime_settings_pass_the_tolerances(tmp_path: Path, kind: str) -> None:
    """The agent's own validation, on sessions unlike the controller's, passes; another model fails it."""
    model = mlp(1, softmax=kind == "int8-softmax")
    if kind.startswith("int8"):
        model = int8(model, tmp_path, static=kind != "int8-dynamic", softmax=kind == "int8-softmax")
    path = tmp_path / "model.onnx"
    path.write_bytes(model)
    manifest = manifest_with(model, data())
    for threads, optimize in [(1, True), (2, True), (1, False), (3, False)]:
        outcome = validate_model(runner(path, threads=threads, optimize=optimize), manifest, latency_budget_ms=None)
        assert outcome.ok, (threads, optimize, outcome.detail)
        assert outcome.close == 1.0
    impostor = mlp(2, softmax=kind == "int8-softmax")
    wrong = manifest_with(model, data(), samples_of=impostor)
    outcome = validate_model(runner(path, threads=1, optimize=True), wrong, latency_budget_ms=None)
    assert not outcome.ok, outcome.detail


def test_int8_tolerances_cover_a_quantization_step_per_layer(tmp_path: Path) -> None:
    """Another CPU's int8 kernels round differently: emulate it by moving every activation's quantization grid."""
    model = int8(mlp(1), tmp_path, static=True)
    graph = onnx.load_from_string(model)
    weights = {n.input[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"} & {
        i.name for i in graph.graph.initializer
    }
    scales = {n.input[1] for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights}
    assert scales, "the static int8 model quantizes its activations"
    for init in graph.graph.initializer:
        if init.name in scales:
            moved = numpy_helper.to_array(init) * np.float32(1.0 + 1.0 / 254)  # half a step at the top of the range
            init.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), init.name))
    shifted = tmp_path / "shifted.onnx"
    onnx.save(graph, str(shifted))
    manifest = manifest_with(model, data())
    outcome = validate_model(runner(shifted, threads=1, optimize=True), manifest, latency_budget_ms=None)
    assert outcome.ok, outcome.detail


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
