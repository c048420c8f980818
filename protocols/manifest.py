"""The artifact manifest: what a compressed model is, how it is split into blocks and how a device checks it.

A manifest is signed (see `signing.py`) and carried inside a `DeployCommand`. It names the artifact's sha256
and the sha256 of every block, a version that only grows per device class, an expiry, the model's inputs and
outputs, a small validation set with tolerances, the metrics measured at compression and the recipe (as plain
JSON data: protocols must not import the compression engine).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from typing import Annotated, Any, Literal, Self

from pydantic import (
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from edgefleet.protocols.errors import ProtocolError
from edgefleet.protocols.wire import (
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    MIN_BLOCK_SIZE,
    DeviceClass,
    Digest,
    Identifier,
    Message,
    UtcDatetime,
    VersionString,
    WireModel,
)

__all__ = [
    "DTYPE_SIZES",
    "MAX_ARTIFACT_BYTES",
    "MAX_INLINE_TENSOR_BYTES",
    "InlineTensor",
    "KeyId",
    "Manifest",
    "SignedManifest",
    "TensorSpec",
    "Tolerances",
    "ValidationSample",
    "block_count",
    "block_digests",
]

MAX_ARTIFACT_BYTES = MAX_BLOCKS * MAX_BLOCK_SIZE
MAX_INLINE_TENSOR_BYTES = 64 * 1024
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$", description="first 16 hex digits of sha256(public key)")]
_Dtype = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
_TensorName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
_MetricName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,63}$")]
_RecipeKey = Annotated[str, Field(max_length=64)]


MAX_RECIPE_DEPTH = 8
MAX_RECIPE_STRING = 1024


def _check_bounded(value: JsonValue, depth: int = 0) -> None:
    # The recipe is free-form JSON from the compression engine; keep it small and shallow all the same.
    if depth > MAX_RECIPE_DEPTH:
        raise ValueError(f"nested deeper than {MAX_RECIPE_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a number is NaN or infinite, which JSON cannot carry")
    if isinstance(value, str) and len(value) > MAX_RECIPE_STRING:
        raise ValueError(f"a string is longer than {MAX_RECIPE_STRING} characters")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        _check_bounded(child, depth + 1)


def block_count(size: int, block_size: int) -> int:
    """How many blocks an artifact of `size` bytes has at `block_size` (the last one may be short)."""
    return max(1, math.ceil(size / block_size))


def block_digests(data: bytes, block_size: int) -> tuple[str, ...]:
    """The sha256 hex digest of each `block_size` slice of `data`, for `Manifest.block_sha256`."""
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ProtocolError(f"block size {block_size} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} bytes")
    if not 0 < len(data) <= MAX_ARTIFACT_BYTES:
        raise ProtocolError(f"artifact of {len(data)} bytes: must be 1..{MAX_ARTIFACT_BYTES} bytes")
    if block_count(len(data), block_size) > MAX_BLOCKS:
        raise ProtocolError(
            f"artifact of {len(data)} bytes needs more than {MAX_BLOCKS} blocks of {block_size}: use larger blocks"
        )
    view = memoryview(data)
    return tuple(
        hashlib.sha256(view[start : start + block_size]).hexdigest() for start in range(0, len(data), block_size)
    )


class TensorSpec(WireModel):
    """One model input or output: name, element type and shape (a dimension is a size or a symbolic name)."""

    name: _TensorName
    dtype: _Dtype
    shape: Annotated[
        tuple[Annotated[int, Field(ge=0, le=2**31)] | Annotated[str, Field(max_length=64)] | None, ...],
        Field(max_length=8),
    ]


class InlineTensor(WireModel):
    """A small array inside the manifest: raw little-endian C-order bytes, base64-encoded.

    On a device: `numpy.frombuffer(t.raw(), dtype=t.dtype).reshape(t.shape)`.
    """

    dtype: _Dtype
    shape: Annotated[tuple[Annotated[int, Field(ge=0, le=MAX_INLINE_TENSOR_BYTES)], ...], Field(max_length=8)]
    data: Annotated[str, Field(max_length=4 * MAX_INLINE_TENSOR_BYTES // 3 + 4, description="base64 of raw bytes")]

    @classmethod
    def from_bytes(cls, raw: bytes, *, dtype: str, shape: tuple[int, ...]) -> InlineTensor:
        """Build from raw bytes (e.g. `array.astype('<f4').tobytes()`)."""
        return cls.model_validate({"dtype": dtype, "shape": shape, "data": base64.b64encode(raw).decode("ascii")})

    def raw(self) -> bytes:
        """The raw little-endian bytes (already checked to match dtype and shape)."""
        return base64.b64decode(self.data)

    @model_validator(mode="after")
    def _data_matches_shape(self) -> Self:
        try:
            raw = base64.b64decode(self.data, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"data: not base64: {exc}") from exc
        expected = math.prod(self.shape) * DTYPE_SIZES[self.dtype]
        if len(raw) != expected:
            raise ValueError(f"data: has {len(raw)} bytes, shape {self.shape} of {self.dtype} needs {expected}")
        return self


class ValidationSample(WireModel):
    """One validation input and the outputs the compressed model gave for it at the controller."""

    inputs: Annotated[dict[_TensorName, InlineTensor], Field(min_length=1, max_length=16)]
    expected: Annotated[dict[_TensorName, InlineTensor], Field(min_length=1, max_length=16)]
    label: Annotated[int | None, Field(ge=0, le=2**31)] = None


class Tolerances(WireModel):
    """How close the device's outputs must be to `expected`: |got - want| <= abs_tol + rel_tol * |want|.

    A sample is *close* when every element of every output passes that test, and *agrees* when every output's
    argmax matches, or when the device's top-1 is within `top1_margin` of the expected top-1 in `expected`
    (`expected[top-1] - expected[device's top-1] < top1_margin`: a near-tie that the device's rounding may flip).
    The model passes when at least `min_close` of the samples are close and `top1_agreement` of them agree.

    `min_close` and `top1_margin` are optional: null (the default) means `min_close = top1_agreement` and exact
    argmax agreement, the rule of manifests that predate them, and a null field is left out of the JSON, so such
    a manifest serialises (and is signed) byte for byte as before.
    """

    abs_tol: Annotated[float, Field(ge=0.0, le=1e6)] = 1e-3
    rel_tol: Annotated[float, Field(ge=0.0, le=1e6)] = 1e-2
    top1_agreement: Annotated[
        float, Field(ge=0.0, le=1.0, description="least fraction of samples whose argmax must match")
    ] = 1.0
    min_close: Annotated[
        float | None,
        Field(ge=0.0, le=1.0, description="least fraction of samples that must be close; null: top1_agreement"),
    ] = None
    top1_margin: Annotated[
        float | None,
        Field(
            ge=0.0,
            le=1e6,
            description="an argmax that differs still agrees when expected[top-1] - expected[device's top-1] is "
            "below this; null: argmaxes must match",
        ),
    ] = None

    @property
    def close_fraction(self) -> float:
        """The least fraction of samples that must be close (`min_close`, else `top1_agreement`)."""
        return self.top1_agreement if self.min_close is None else self.min_close

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for key in _OPTIONAL_TOLERANCES:
                if data.get(key, 0.0) is None:
                    del data[key]
        return data


_OPTIONAL_TOLERANCES = ("min_close", "top1_margin")


class Manifest(Message):
    """Everything a device needs to fetch, check, run and validate one artifact. Sign it before sending."""

    artifact_name: Identifier
    model_name: Identifier
    device_class: DeviceClass
    version: Annotated[int, Field(ge=1, le=2**31 - 1, description="grows per device class; never reused")]
    sha256: Digest
    size_bytes: Annotated[int, Field(ge=1, le=MAX_ARTIFACT_BYTES)]
    block_size: Annotated[int, Field(ge=MIN_BLOCK_SIZE, le=MAX_BLOCK_SIZE)]
    block_sha256: Annotated[tuple[Digest, ...], Field(min_length=1, max_length=MAX_BLOCKS)]
    created_at: UtcDatetime
    expires_at: UtcDatetime
    key_id: KeyId
    inputs: Annotated[tuple[TensorSpec, ...], Field(min_length=1, max_length=16)]
    outputs: Annotated[tuple[TensorSpec, ...], Field(min_length=1, max_length=16)]
    validation_samples: Annotated[tuple[ValidationSample, ...], Field(max_length=64)] = ()
    tolerances: Tolerances = Tolerances()
    latency_budget_ms: Annotated[float | None, Field(gt=0.0, le=1e6)] = None
    metrics: Annotated[dict[_MetricName, float], Field(max_length=64)] = Field(default_factory=dict)
    recipe: Annotated[tuple[dict[_RecipeKey, JsonValue], ...], Field(max_length=32)] = ()
    opset: Annotated[int, Field(ge=7, le=30)]
    min_onnxruntime_version: VersionString

    @field_validator("recipe")
    @classmethod
    def _recipe_is_bounded(cls, recipe: tuple[dict[str, JsonValue], ...]) -> tuple[dict[str, JsonValue], ...]:
        for step in recipe:
            _check_bounded(step)
        return recipe

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        expected = block_count(self.size_bytes, self.block_size)
        if len(self.block_sha256) != expected:
            raise ValueError(
                f"block_sha256: has {len(self.block_sha256)} digests; {self.size_bytes} bytes in blocks of "
                f"{self.block_size} make {expected}"
            )
        if self.expires_at <= self.created_at:
            raise ValueError("expires_at: is not after created_at")
        return self

    @property
    def block_total(self) -> int:
        """Number of blocks of the artifact."""
        return len(self.block_sha256)

    def block_length(self, index: int) -> int:
        """Length in bytes of block `index` (all are `block_size` but the last)."""
        if not 0 <= index < self.block_total:
            raise ProtocolError(f"block {index} is outside 0..{self.block_total - 1} of artifact {self.sha256}")
        if index < self.block_total - 1:
            return self.block_size
        return self.size_bytes - self.block_size * (self.block_total - 1)


class SignedManifest(Message):
    """A manifest with its Ed25519 signature (base64 of 64 bytes) over `canonical_bytes(manifest)`."""

    manifest: Manifest
    key_id: KeyId
    signature: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$", description="base64 Ed25519 signature")]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.key_id != self.manifest.key_id:
            raise ValueError(f"key_id: {self.key_id} differs from manifest.key_id {self.manifest.key_id}")
        # Only one spelling of the 64 bytes is accepted: a flipped padding bit must not pass as the same signature.
        if base64.b64encode(base64.b64decode(self.signature)).decode("ascii") != self.signature:
            raise ValueError("signature: not canonical base64")
        return self

    def signature_bytes(self) -> bytes:
        """The raw 64-byte signature."""
        return base64.b64decode(self.signature)
