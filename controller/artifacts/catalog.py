"""Artifacts: a model built for one device class, stored by sha256, described by a signed manifest.

The version number per class comes from `DeviceClass.last_version`, bumped with an UPDATE inside the same
transaction that inserts the artifact, so two controllers adding artifacts at once still get distinct,
growing versions (the UPDATE takes the row/database write lock first).

Example::

    catalog = ArtifactCatalog(db, store=ArtifactStore(home / "artifacts"), signing_key=key)
    artifact = catalog.add_from_onnx("mnist-mlp", class_name="rpi4", onnx_path=Path("model.onnx"))
    # with validation samples the devices check its outputs (and time it) before they switch to it:
    artifact = catalog.add_from_onnx(..., validation=ValidationSet.load(Path("val.npz")))
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import JsonValue, ValidationError
from sqlmodel import Session, col, select

from edgefleet.controller.artifacts.onnx_info import read_onnx_info
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.artifacts.validation_set import ValidationSet, build_validation
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import profile_of
from edgefleet.controller.data.tables import Artifact, AuditEntry, DeviceClass, Model, utcnow
from edgefleet.controller.errors import NotFoundError, RegistryError, StoreError
from edgefleet.protocols.codec import MAX_PAYLOAD_BYTES, MessageKind
from edgefleet.protocols.errors import ProtocolError
from edgefleet.protocols.manifest import Manifest, SignedManifest, Tolerances, block_digests
from edgefleet.protocols.signing import key_id, public_key_of, sign_manifest

__all__ = ["ArtifactCatalog", "artifact_name"]

MANIFEST_TTL = dt.timedelta(days=365)
# A deploy command wraps the signed manifest with a few hundred bytes of its own and must stay within the wire limit.
_MAX_SIGNED_BYTES = MAX_PAYLOAD_BYTES[MessageKind.COMMAND] - 4096


def artifact_name(model: str, class_name: str, version: int) -> str:
    """A readable id for the manifest: `<model>.<class>.v<version>` (cut to the wire's 64 characters)."""
    suffix = f".{class_name}.v{version}"
    return model[: 64 - len(suffix)] + suffix


class ArtifactCatalog:
    """Adds, signs and lists artifacts. The only writer of `artifacts` rows and of `DeviceClass.last_version`."""

    def __init__(
        self,
        db: Database,
        *,
        store: ArtifactStore,
        signing_key: Ed25519PrivateKey | None = None,
        actor: str = "operator",
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.db = db
        self.store = store
        self.signing_key = signing_key
        self.actor = actor
        self.clock = clock

    def add_from_onnx(
        self,
        model_name: str,
        *,
        class_name: str,
        onnx_path: Path,
        recipe: tuple[dict[str, JsonValue], ...] = (),
        metrics: Mapping[str, float] | None = None,
        validation: ValidationSet | None = None,
    ) -> Artifact:
        """Store the ONNX file, sign its manifest with the next version of the class, record it.

        With `validation`, the manifest carries samples of it with this model's outputs and tolerances (see
        `validation_set.build_validation`), checked by the devices before they switch; without, they only check
        that the model loads. A `ValidationDataError` (data that does not fit the model) stores nothing.
        """
        key = self.signing_key
        if key is None:
            raise RegistryError("no signing key loaded: run `edgefleet init` first")
        info = read_onnx_info(onnx_path)
        data = onnx_path.read_bytes()
        samples, tolerances = build_validation(data, validation) if validation is not None else ((), Tolerances())
        digest, size = self.store.put_bytes(data)
        measured = dict(metrics or {})
        with self.db.transaction(f"adding an artifact of {model_name!r} for class {class_name!r}") as session:
            if session.get(Model, model_name) is None:
                raise NotFoundError(f"model {model_name!r} does not exist (add it with `edgefleet model add`)")
            row = session.get(DeviceClass, class_name)
            if row is None:
                raise NotFoundError(f"device class {class_name!r} does not exist (see `edgefleet class list`)")
            profile = profile_of(row)
            if info.opset > profile.opset:
                raise RegistryError(
                    f"{onnx_path} uses ONNX opset {info.opset}; class {class_name} supports up to {profile.opset}"
                )
            # The UPDATE comes first so that it takes the write/row lock before the new version is read.
            session.execute(
                sa.update(DeviceClass)
                .where(col(DeviceClass.name) == class_name)
                .values(last_version=col(DeviceClass.last_version) + 1)
            )
            session.refresh(row)
            now = self.clock()
            try:
                manifest = Manifest(
                    artifact_name=artifact_name(model_name, class_name, row.last_version),
                    model_name=model_name,
                    device_class=class_name,
                    version=row.last_version,
                    sha256=digest,
                    size_bytes=size,
                    block_size=profile.block_size_bytes,
                    block_sha256=block_digests(data, profile.block_size_bytes),
                    created_at=now,
                    expires_at=now + MANIFEST_TTL,
                    key_id=key_id(public_key_of(key)),
                    inputs=info.inputs,
                    outputs=info.outputs,
                    validation_samples=samples,
                    tolerances=tolerances,
                    latency_budget_ms=profile.latency_budget_ms,
                    metrics=measured,
                    recipe=recipe,
                    opset=info.opset,
                    min_onnxruntime_version=profile.onnxruntime_version,
                )
            except (ValidationError, ProtocolError) as exc:
                raise StoreError(f"cannot describe {onnx_path} in a manifest: {exc}") from exc
            signed = sign_manifest(manifest, key)
            wire_size = len(signed.model_dump_json())
            if wire_size > _MAX_SIGNED_BYTES:
                raise StoreError(f"the signed manifest of {onnx_path} is {wire_size} bytes, over {_MAX_SIGNED_BYTES}")
            return self._record(session, signed, recipe=recipe, metrics=measured)

    def _record(
        self,
        session: Session,
        signed: SignedManifest,
        *,
        recipe: tuple[dict[str, JsonValue], ...],
        metrics: dict[str, float],
    ) -> Artifact:
        m = signed.manifest
        artifact = Artifact(
            model_name=m.model_name,
            class_name=m.device_class,
            version=m.version,
            sha256=m.sha256,
            size=m.size_bytes,
            recipe_json=json.dumps(list(recipe), sort_keys=True),
            metrics_json=json.dumps(metrics, sort_keys=True),
            manifest_json=signed.model_dump_json(),
            signature=signed.signature,
            key_id=signed.key_id,
            created_at=m.created_at,
        )
        session.add(artifact)
        session.flush()
        session.add(
            AuditEntry(
                at=m.created_at,
                actor=self.actor,
                action="artifact.add",
                target=f"{m.model_name}@{m.device_class}",
                detail_json=json.dumps({"version": m.version, "sha256": m.sha256, "size": m.size_bytes}),
            )
        )
        return artifact

    def list(self, *, model: str | None = None, class_name: str | None = None) -> list[Artifact]:
        query = select(Artifact).order_by(col(Artifact.class_name), col(Artifact.version))
        if model is not None:
            query = query.where(Artifact.model_name == model)
        if class_name is not None:
            query = query.where(Artifact.class_name == class_name)
        with self.db.reading() as session:
            return list(session.exec(query).all())

    def get(self, ref: str | int) -> Artifact:
        """By id (`7`) or by `class:version` (`rpi4:3`)."""
        with self.db.reading(f"reading artifact {ref!r}") as session:
            row = self._lookup(session, ref)
        if row is None:
            raise NotFoundError(f"artifact {ref!r} does not exist (see `edgefleet artifact list`)")
        return row

    @staticmethod
    def _lookup(session: Any, ref: str | int) -> Artifact | None:
        text = str(ref)
        if text.isdigit():
            found: Artifact | None = session.get(Artifact, int(text))
            return found
        class_name, _, version = text.partition(":")
        if not version.isdigit():
            raise RegistryError(f"artifact reference {text!r} is not an id (7) or class:version (rpi4:3)")
        row: Artifact | None = session.exec(
            select(Artifact).where(Artifact.class_name == class_name, Artifact.version == int(version))
        ).first()
        return row

    @staticmethod
    def signed_manifest(artifact: Artifact) -> SignedManifest:
        try:
            return SignedManifest.model_validate_json(artifact.manifest_json)
        except ValidationError as exc:
            raise RegistryError(f"artifact {artifact.id}: its stored manifest no longer validates ({exc})") from exc
