"""The update steps that touch bytes: manifest checks, the downloaded artifact's digest, the slot install."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime

from edgefleet.agent.download import Download
from edgefleet.agent.errors import AgentError
from edgefleet.agent.runner import runtime_version
from edgefleet.agent.slots import Slots
from edgefleet.protocols.codes import ResultCode
from edgefleet.protocols.errors import DigestMismatchError, IncompatibleError
from edgefleet.protocols.manifest import Manifest, SignedManifest
from edgefleet.protocols.profile import DeviceProfile
from edgefleet.protocols.signing import check_compatible, verify_manifest

__all__ = ["NoStorageError", "SimulatedCrashError", "install_into_slot", "verify_download", "verify_signed"]


class SimulatedCrashError(AgentError):
    """Fault injection: the agent 'loses power' here (the simulator restarts it from its data directory)."""


class NoStorageError(IncompatibleError):
    """The artifact is larger than the device class may store."""

    result_code = ResultCode.NO_STORAGE


def verify_signed(
    signed: SignedManifest,
    *,
    trusted_keys: Mapping[str, bytes],
    now: datetime,
    current_version: int | None,
    allow_rollback: bool,
    profile: DeviceProfile,
) -> Manifest:
    """Key, signature, expiry, version, then class/opset/runtime fit and storage; each failure its own error."""
    manifest = verify_manifest(
        signed, trusted_keys=trusted_keys, now=now, current_version=current_version, allow_rollback=allow_rollback
    )
    # The class and opset from the profile; the runtime is the one installed here, which is what will load the model.
    check_compatible(manifest, profile.model_copy(update={"onnxruntime_version": runtime_version()}))
    if manifest.size_bytes > profile.storage_budget_bytes:
        raise NoStorageError(
            f"artifact {manifest.artifact_name} v{manifest.version} has {manifest.size_bytes} bytes; "
            f"device class {profile.name} may store {profile.storage_budget_bytes}"
        )
    return manifest


def verify_download(manifest: Manifest, download: Download) -> None:
    """The assembled file has the manifest's size and sha256 (every block was checked on arrival too)."""
    if not download.complete:
        raise DigestMismatchError(f"artifact {manifest.artifact_name}: download is incomplete")
    size = download.part_path.stat().st_size
    if size != manifest.size_bytes:
        raise DigestMismatchError(
            f"artifact {manifest.artifact_name} has {size} bytes, manifest says {manifest.size_bytes}"
        )
    digest = download.sha256()
    if not hmac.compare_digest(digest, manifest.sha256):
        raise DigestMismatchError(
            f"artifact {manifest.artifact_name} hashes to {digest}, manifest says {manifest.sha256}"
        )


def install_into_slot(slots: Slots, download: Download, manifest: Manifest, *, crash: bool = False) -> None:
    """Copy the verified artifact into the inactive slot; `crash` stops half-way as a power cut would."""
    if crash:
        target = slots.root / slots.inactive_name()
        target.mkdir(parents=True, exist_ok=True)
        half = download.part_path.read_bytes()[: manifest.size_bytes // 2]
        (target / "model.onnx").write_bytes(half)
        raise SimulatedCrashError(f"simulated power cut while installing {manifest.artifact_name}")
    meta = {
        "artifact_name": manifest.artifact_name,
        "model_name": manifest.model_name,
        "version": manifest.version,
        "sha256": manifest.sha256,
        "installed_digest": hashlib.sha256(download.part_path.read_bytes()).hexdigest(),
    }
    slots.install(download.part_path, meta)
