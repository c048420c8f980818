"""Can the device's runtime load an artifact? ONNX opset and IR version against the profile's opset and onnxruntime.

onnxruntime runs every opset from 7 up to the one its release implements, and refuses models whose IR version is
newer than it knows (`Unsupported model IR version`). The table below is onnxruntime's published compatibility
matrix; releases newer than its last row are assumed to run at least what that row runs.
"""

from __future__ import annotations

import onnx

from edgefleet.protocols.profile import DeviceProfile

__all__ = ["MIN_QDQ_OPSET", "artifact_versions", "effective_opset", "incompatibilities", "runtime_limits"]

# onnxruntime release (major, minor) -> (highest ONNX opset implemented, highest IR version loaded)
_ORT_MATRIX: dict[tuple[int, int], tuple[int, int]] = {
    (1, 0): (11, 6), (1, 1): (11, 6), (1, 2): (11, 6), (1, 3): (12, 7), (1, 4): (12, 7), (1, 5): (12, 7),
    (1, 6): (13, 7), (1, 7): (13, 7), (1, 8): (14, 7), (1, 9): (15, 8), (1, 10): (15, 8), (1, 11): (16, 8),
    (1, 12): (17, 8), (1, 13): (17, 8), (1, 14): (18, 8), (1, 15): (19, 8), (1, 16): (19, 9), (1, 17): (20, 9),
    (1, 18): (21, 10),
}  # fmt: skip
MIN_QDQ_OPSET = 13
"""Per-channel QuantizeLinear/DequantizeLinear (the `axis` attribute) arrived in opset 13."""


def runtime_limits(profile: DeviceProfile) -> tuple[int, int]:
    """(highest opset, highest IR version) the profile's onnxruntime release runs."""
    version = profile.onnxruntime_tuple()[:2]
    major_minor = (version[0], version[1] if len(version) > 1 else 0)
    known = sorted(_ORT_MATRIX)
    if major_minor >= known[-1]:
        return _ORT_MATRIX[known[-1]]
    if major_minor < known[0]:
        return (10, 5)
    older = [v for v in known if v <= major_minor]
    return _ORT_MATRIX[older[-1]]


def effective_opset(profile: DeviceProfile) -> int:
    """The highest opset a model for this profile may use: the profile's, capped by what its onnxruntime runs."""
    return min(profile.opset, runtime_limits(profile)[0])


def artifact_versions(data: bytes) -> tuple[int, int]:
    """(default-domain opset, IR version) of an ONNX model."""
    model = onnx.load_from_string(data)
    opset = max((o.version for o in model.opset_import if o.domain in {"", "ai.onnx"}), default=0)
    return int(opset), int(model.ir_version)


def incompatibilities(data: bytes, profile: DeviceProfile) -> list[str]:
    """Why the profile's runtime cannot load this model (empty if it can)."""
    opset, ir_version = artifact_versions(data)
    max_opset, max_ir = runtime_limits(profile)
    problems = []
    if opset > profile.opset:
        problems.append(f"uses ONNX opset {opset}, the profile supports opset {profile.opset}")
    elif opset > max_opset:
        problems.append(
            f"uses ONNX opset {opset}; onnxruntime {profile.onnxruntime_version} implements up to {max_opset}"
        )
    if ir_version > max_ir:
        problems.append(f"has IR version {ir_version}; onnxruntime {profile.onnxruntime_version} loads up to {max_ir}")
    return problems
