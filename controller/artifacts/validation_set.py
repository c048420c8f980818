"""Validation samples for a manifest: a few inputs, the outputs this model gives for them, and tolerances.

A device runs the samples before it switches to a new model (agent/validate.py) and rolls back when the outputs
are not close to `expected` or their argmax disagrees too often; the runs also time the model against the class
budget. Without samples the device can only check that the model loads.

    vset = ValidationSet.load(Path("val.npz"))              # arrays x (N, features...) and optional y (N,)
    samples, tolerances = build_validation(Path("model.onnx"), vset, count=16)
    catalog.add_from_onnx("digits", class_name="rpi4", onnx_path=path, validation=vset)   # does the same inside

The expected outputs come from onnxruntime on one thread with its default graph optimizations (and, for int8 kernels
on x86, its exact "x64 precision" mode: the fast AVX2 u8s8 kernel sums products in pairs into int16 and can
saturate, so the samples do not depend on the controller's CPU). The tolerances depend on how the model computes
(controller/artifacts/numerics.py: `tolerances_for`); an int8 model's are counted in steps of its output's quantization
grid (`output_steps`, read from the graph) and come from what quantization can change: the samples are run again on
copies of the graph whose every layer requantizes one step up, then one step down (`shifted`), and the largest
output move, with room to spare, is the tolerance. They are checked here before they go out: the same samples run
again with two threads and graph optimizations off (for an int8 QDQ graph that is the float fake-quant path instead
of the fused integer kernels) and, for int8, on the shifted graphs, must pass them, with the rule the device
applies. Samples whose top-1 margin is within what the tolerance lets move are not picked when the data has enough
others.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.artifacts.numerics import NumericKind, numeric_kind, output_steps, shifted, tolerances_for
from edgefleet.controller.errors import ValidationDataError
from edgefleet.protocols.manifest import (
    DTYPE_SIZES,
    MAX_INLINE_TENSOR_BYTES,
    InlineTensor,
    Tolerances,
    ValidationSample,
)

__all__ = [
    "MAX_SAMPLES",
    "MAX_VALIDATION_BYTES",
    "MAX_VALIDATION_FILE_BYTES",
    "ValidationSet",
    "build_validation",
]

MAX_SAMPLES = 64
"""The manifest carries at most 64 validation samples."""
MAX_VALIDATION_BYTES = 256 * 1024
"""Raw bytes of all samples' inputs and expected outputs together: base64 makes ~342 KiB of them, which leaves room
in the 1 MiB deploy command for a manifest of 4096 block digests (~270 KiB)."""
MAX_VALIDATION_FILE_BYTES = 256 * 2**20
"""An .npz (and every array in it, uncompressed) larger than this is refused before it is read."""
_MAX_RANK = 8  # InlineTensor shapes have at most 8 axes: (1, *features) for one sample
_MAX_LABEL = 2**31
_POOL_FACTOR = 4  # candidates looked at per sample kept, so that near-ties can be skipped
_LEVELS = 255  # steps in an 8-bit range


@dataclass(frozen=True, slots=True)
class ValidationSet:
    """Labelled (or unlabelled) inputs to build validation samples from: `inputs` float32 (N, features...)."""

    inputs: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, inputs: Any, labels: Any = None) -> ValidationSet:
        """Check and convert: float inputs of at least two axes, finite; integer labels >= 0, one per input."""
        x = np.asarray(inputs)
        if x.dtype.kind != "f":
            raise ValidationDataError(f"inputs: dtype {x.dtype}; expected floating point numbers (float32)")
        if x.ndim < 2 or x.ndim > _MAX_RANK:
            raise ValidationDataError(f"inputs: shape {x.shape}; expected (samples, features...) with 2..8 axes")
        if x.shape[0] < 1 or x.size == 0:
            raise ValidationDataError(f"inputs: shape {x.shape} holds no samples")
        if x.nbytes > MAX_VALIDATION_FILE_BYTES:
            raise ValidationDataError(f"inputs: {x.nbytes} bytes, more than {MAX_VALIDATION_FILE_BYTES}")
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf, refused just below
            x32 = np.array(x, dtype=np.float32, order="C", copy=True)  # a copy: the caller's array stays writable
        if not np.isfinite(x32).all():
            raise ValidationDataError("inputs: contain NaN or infinite values (or values beyond float32's range)")
        x32.flags.writeable = False
        return cls(inputs=x32, labels=None if labels is None else _labels(labels, x32.shape[0]))

    @classmethod
    def load(cls, path: Path) -> ValidationSet:
        """Read an .npz with `x` (or `inputs`, or `x_val`) and optional `y` (or `labels`, `y_val`); no pickles."""
        arrays = _read_npz(Path(path))
        x_key = next((k for k in ("x", "inputs", "x_val") if k in arrays), None)
        if x_key is None:
            raise ValidationDataError(f"{path}: no array named x (or inputs); it holds {sorted(arrays) or 'nothing'}")
        y_key = next((k for k in ("y", "labels", "y_val") if k in arrays), None)
        try:
            return cls.from_arrays(arrays[x_key], None if y_key is None else arrays[y_key])
        except ValidationDataError as exc:
            raise ValidationDataError(f"{path}: {exc}") from exc

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _labels(labels: Any, count: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise ValidationDataError(f"labels: dtype {y.dtype}; expected integer class indices")
    if y.ndim != 1 or y.shape[0] != count:
        raise ValidationDataError(f"labels: shape {y.shape}; expected ({count},), one label per input")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= _MAX_LABEL):
        raise ValidationDataError(f"labels: values must be 0..{_MAX_LABEL - 1}, got {int(y.min())}..{int(y.max())}")
    out = y.astype(np.int64, copy=True)
    out.flags.writeable = False
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValidationDataError(f"cannot read validation data {path} ({exc.strerror or exc})") from exc
    if size > MAX_VALIDATION_FILE_BYTES:
        raise ValidationDataError(f"{path} is {size} bytes, more than {MAX_VALIDATION_FILE_BYTES}")
    if not zipfile.is_zipfile(path):
        raise ValidationDataError(f"{path} is not an .npz file (numpy.savez / savez_compressed)")
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
            if unpacked > MAX_VALIDATION_FILE_BYTES:  # a small file may inflate to gigabytes
                raise ValidationDataError(f"{path} unpacks to {unpacked} bytes, more than {MAX_VALIDATION_FILE_BYTES}")
            for info in archive.infolist():
                _check_npy_header(path, archive, info)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValidationDataError(f"{path} is not a readable .npz file ({exc})") from exc
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False", bad headers
        reason = "it holds pickled (object) arrays, which are refused" if "pickle" in str(exc) else str(exc)
        raise ValidationDataError(f"{path}: cannot load the arrays: {reason}") from exc
    except (OSError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
        raise ValidationDataError(f"{path} is not a readable .npz file ({exc!r})") from exc


def _check_npy_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """numpy allocates the shape an .npy header claims before reading any data: a 300-byte file can ask for 64 GiB.
    So the claimed array must fit in the bytes the member really holds (and the file cap), checked before loading."""
    if not info.filename.endswith(".npy"):
        return
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version in {(2, 0), (3, 0)}:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValidationDataError(f"{path}: {info.filename} has .npy format {version}, which is not known")
    except ValueError as exc:  # bad magic, bad header, pickled dtype descriptions
        raise ValidationDataError(f"{path}: {info.filename} has no readable .npy header ({exc})") from exc
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > min(info.file_size, MAX_VALIDATION_FILE_BYTES):
        raise ValidationDataError(
            f"{path}: {info.filename} claims shape {shape} of {dtype} ({claimed} bytes) but holds {info.file_size}"
        )


def build_validation(
    onnx_path_or_bytes: Path | bytes, vset: ValidationSet, *, count: int = 16, seed: int = 0
) -> tuple[tuple[ValidationSample, ...], Tolerances]:
    """Pick up to `count` samples (deterministic for a seed), run the model on each, choose the tolerances.

    Fewer samples come back when the manifest's size limits need it; `ValidationDataError` when the data does not
    fit the model's input, when not even one sample fits, or when the model's own outputs drift outside the
    tolerances between two onnxruntime configurations or, for int8, on its shifted grids (it would then fail
    validation on the devices too).
    """
    if not 1 <= count <= MAX_SAMPLES:
        raise ValidationDataError(f"count {count}: a manifest carries 1..{MAX_SAMPLES} validation samples")
    data = _model_bytes(onnx_path_or_bytes)
    model = _parse(data)
    kind = numeric_kind(model)
    main = _Model(data, threads=1, optimize=True)
    others = [_Model(data, threads=2, optimize=False)]
    if kind is NumericKind.INT8:
        variants = (shifted(model, sign) for sign in (1, -1))
        others += [_Model(v.SerializeToString(), threads=1, optimize=True) for v in variants if v is not None]
    sample_shape = main.sample_shape(vset)
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(vset))]
    first = main.run(vset.inputs[order[0]].reshape(sample_shape))
    per_sample = main.input_bytes(sample_shape) + sum(_checked_size(n, a) for n, a in first.items())
    count = min(count, len(vset), MAX_VALIDATION_BYTES // per_sample)
    if count < 1:
        raise ValidationDataError(
            f"one validation sample takes {per_sample} bytes, more than the manifest's {MAX_VALIDATION_BYTES}"
        )
    pool = order[: min(len(order), count * _POOL_FACTOR)]
    feeds = [vset.inputs[i].reshape(sample_shape).astype(main.input_dtype) for i in pool]
    expected = [main.run(x) for x in feeds]
    runs = [[other.run(x) for x in feeds] for other in others]
    if kind is NumericKind.INT8:
        step = max(_steps(output_steps(model), expected).values(), default=None)
        tolerances = tolerances_for(kind, _scale(expected), step=step, drift=_drift(expected, runs))
    else:
        tolerances = tolerances_for(kind, _scale(expected))
    ranked = sorted(range(len(pool)), key=lambda j: _rank(expected[j], [run[j] for run in runs], tolerances))
    picked = sorted(ranked[:count])  # keep the seed's order among the samples picked
    for run in runs:
        close, agree = _fractions([expected[j] for j in picked], [run[j] for j in picked], tolerances)
        if close < tolerances.close_fraction or agree < tolerances.top1_agreement:
            raise ValidationDataError(
                f"the model's outputs change between onnxruntime settings (or requantized a step off) beyond its "
                f"{kind.value} tolerances (abs {tolerances.abs_tol:g}, rel {tolerances.rel_tol:g}): {close:.2f} of "
                f"the samples close, {agree:.2f} with the same argmax; devices would reject it"
            )
    samples = tuple(
        _sample(main.input_name, feeds[j], expected[j], None if vset.labels is None else int(vset.labels[pool[j]]))
        for j in picked
    )
    return samples, tolerances


def _steps(declared: dict[str, float], expected: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Each output's grid step: the one the graph declares, else, for a float output, the step of an 8-bit grid
    over the range its expected values take (0 included, as quantizers do)."""
    steps = dict(declared)
    for name in expected[0] if expected else ():
        values = [out[name].ravel() for out in expected if out[name].dtype.kind == "f"]
        flat = np.concatenate([np.zeros(1), *values]).astype(np.float64)
        if name not in steps and flat.size > 1:
            steps[name] = float(flat.max() - flat.min()) / _LEVELS
    return steps


def _drift(expected: list[dict[str, np.ndarray]], runs: list[list[dict[str, np.ndarray]]]) -> float:
    """The largest |other run - expected| over every output element, sample and run."""
    worst = 0.0
    for run in runs:
        for want, got in zip(expected, run, strict=True):
            for name, w in want.items():
                g = got.get(name)
                if g is not None and g.shape == w.shape and w.size:
                    worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))))
    return worst


def _model_bytes(source: Path | bytes) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ValidationDataError(f"cannot read ONNX file {source} ({exc.strerror or exc})") from exc


def _parse(data: bytes) -> Any:
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValidationDataError(f"not an ONNX model ({type(exc).__name__}: {exc})") from exc


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class _Model:
    """One onnxruntime session over the model bytes, run one sample at a time as a device does."""

    def __init__(self, data: bytes, *, threads: int, optimize: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # x86 without VNNI: exact int8 kernels instead of AVX2's pairwise int16 sums, which saturate for 8-bit
        # weights; ignored elsewhere. The expected outputs then do not depend on the controller's CPU.
        options.add_session_config_entry("session.x64quantprecision", "1")
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ValidationDataError(f"onnxruntime cannot load the model: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ValidationDataError(f"validation samples need a model with one input; this one has {names}")
        self.input_name: str = inputs[0].name
        self.input_shape: list[int | str | None] = list(inputs[0].shape)
        dtype = _ORT_DTYPES.get(inputs[0].type)
        if dtype is None:
            raise ValidationDataError(f"model input {self.input_name!r} is {inputs[0].type}; only float inputs")
        self.input_dtype = np.dtype(dtype)

    def sample_shape(self, vset: ValidationSet) -> tuple[int, ...]:
        """The shape one sample is fed with: (1, *features), or the features alone for a model without batch axis."""
        features = tuple(int(d) for d in vset.inputs.shape[1:])
        want = self.input_shape
        shape = (1, *features) if len(want) == len(features) + 1 else features
        fits = len(want) == len(shape) and all(
            not isinstance(w, int) or w == s for w, s in zip(want, shape, strict=True)
        )
        if not fits:
            shown = tuple(w if isinstance(w, int) else "N" for w in want)
            raise ValidationDataError(
                f"the validation data has samples of shape {features}; the model's input {self.input_name!r} "
                f"wants {shown}"
            )
        return shape

    def input_bytes(self, shape: tuple[int, ...]) -> int:
        size = math.prod(shape) * self.input_dtype.itemsize
        if size > MAX_INLINE_TENSOR_BYTES:
            raise ValidationDataError(
                f"one input sample is {size} bytes; a manifest carries tensors of up to {MAX_INLINE_TENSOR_BYTES}"
            )
        return size

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        try:
            outputs = self.session.run(None, {self.input_name: x.astype(self.input_dtype)})
        except Exception as exc:  # shape/type mismatches inside the graph
            raise ValidationDataError(f"the model fails on a validation sample of shape {x.shape}: {exc}") from exc
        names = [o.name for o in self.session.get_outputs()]
        return {name: np.asarray(out) for name, out in zip(names, outputs, strict=True)}


def _checked_size(name: str, array: np.ndarray) -> int:
    if array.dtype.name not in DTYPE_SIZES or array.ndim > _MAX_RANK:
        raise ValidationDataError(f"model output {name!r} is {array.dtype} of shape {array.shape}: not a tensor")
    if array.nbytes > MAX_INLINE_TENSOR_BYTES:
        raise ValidationDataError(f"model output {name!r} has {array.nbytes} bytes per sample, too many to carry")
    return int(array.nbytes)


def _floats(outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [a.astype(np.float64) for a in outputs.values() if a.dtype.kind == "f"]


def _scale(expected: list[dict[str, np.ndarray]]) -> float:
    values = [float(np.abs(a).max()) for out in expected for a in _floats(out) if a.size]
    return max(values, default=1.0)


def _check(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: Tolerances) -> tuple[bool, bool]:
    """(close, agrees) by the rule a device applies (agent/validate.py)."""
    close = agree = True
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape:
            return False, False
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        close &= bool(np.all(np.abs(g64 - w64) <= tol.abs_tol + tol.rel_tol * np.abs(w64)))
        picked = g.argmax(axis=-1)
        same = np.asarray(picked == w.argmax(axis=-1))
        if tol.top1_margin is not None and w.ndim and not same.all():
            gap = w64.max(axis=-1) - np.take_along_axis(w64, np.expand_dims(picked, -1), axis=-1)[..., 0]
            same |= gap < tol.top1_margin
        agree &= bool(same.all())
    return close, agree


def _fractions(
    expected: list[dict[str, np.ndarray]], again: list[dict[str, np.ndarray]], tol: Tolerances
) -> tuple[float, float]:
    checks = [_check(g, w, tol) for g, w in zip(again, expected, strict=True)]
    total = max(1, len(checks))
    return sum(c for c, _ in checks) / total, sum(a for _, a in checks) / total


def _rank(want: dict[str, np.ndarray], runs: list[dict[str, np.ndarray]], tol: Tolerances) -> tuple[int, float]:
    """Sort key: samples close in every other run and whose argmax cannot flip within the tolerances first (then
    by how far from a tie: a top-1 margin inside what rounding can change is not a sample worth carrying)."""
    steady = all(all(_check(got, want, tol)) for got in runs)
    margins = []
    for a in _floats(want):
        if a.shape[-1:] and a.shape[-1] > 1:
            top2 = np.sort(a, axis=-1)[..., -2:]
            slack = np.maximum(2 * (tol.abs_tol + tol.rel_tol * np.abs(top2[..., 1])), tol.top1_margin or 0.0)
            margins.append(float(np.min((top2[..., 1] - top2[..., 0]) / slack)))
    margin = min(margins, default=math.inf)
    stable = steady and margin > 1.0
    return (0 if stable else 1, 0.0 if stable else -margin)


def _tensor(array: np.ndarray) -> InlineTensor:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return InlineTensor.from_bytes(little.tobytes(), dtype=array.dtype.name, shape=tuple(int(d) for d in array.shape))


def _sample(input_name: str, x: np.ndarray, expected: dict[str, np.ndarray], label: int | None) -> ValidationSample:
    return ValidationSample(
        inputs={input_name: _tensor(x)}, expected={n: _tensor(a) for n, a in expected.items()}, label=label
    )
