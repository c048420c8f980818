"""Artifacts made by the controller's catalog, with validation samples, deployed to a real agent over Mosquitto:
the device validates them against the samples, and rolls back by itself from samples that belong to another model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from agentkit import PROFILE, Fleet, tiny_model
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.artifacts.validation_set import ValidationSet, build_validation
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.protocols.codes import ResultCode
from edgefleet.protocols.signing import sign_manifest

pytestmark = pytest.mark.mqtt


@pytest.fixture
def catalog(fleet: Fleet, tmp_path: Path) -> ArtifactCatalog:
    """The controller's registry and catalog, signing with the key the agents trust, for the agents' class."""
    db = Database.open(f"sqlite:///{tmp_path / 'registry.db'}", timeout=1)
    db.migrate()
    registry = Registry(db, actor="tester")
    registry.add_class(PROFILE)
    registry.add_model("tiny", source="onnx:tiny.onnx", task="classification")
    key = Ed25519PrivateKey.from_private_bytes(fleet.keys.private)
    return ArtifactCatalog(db, store=ArtifactStore(tmp_path / "store"), signing_key=key)


def _vset() -> ValidationSet:
    rng = np.random.default_rng(5)
    return ValidationSet.from_arrays(rng.normal(size=(100, 4)).astype(np.float32), rng.integers(0, 3, 100))


def _add(catalog: ArtifactCatalog, fleet: Fleet, tmp_path: Path, model: bytes, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(model)
    fleet.controller.offer(model, tmp_path)
    return path


def test_catalog_artifact_with_samples_validates_on_the_device(
    fleet: Fleet, catalog: ArtifactCatalog, tmp_path: Path
) -> None:
    path = _add(catalog, fleet, tmp_path, tiny_model(1, pad_bytes=9000), "a.onnx")
    artifact = catalog.add_from_onnx("tiny", class_name=PROFILE.name, onnx_path=path, validation=_vset())
    signed = catalog.signed_manifest(artifact)
    assert len(signed.manifest.validation_samples) == 16
    agent = fleet.start_agent("dev-v")
    fleet.controller.deploy("dev-v", signed, job_id="job-1")
    event = fleet.controller.wait_final("dev-v", "job-1")
    assert (event.state.value, event.result, event.model_version) == ("active", ResultCode.OK, 1)
    validated = [e for e in fleet.controller.events["dev-v"] if e.job_id == "job-1" and e.state.value == "active"]
    assert validated[0].detail.startswith("16 samples ok, p95"), validated[0].detail  # outputs checked and timed
    current = agent.slots.current()
    assert current is not None
    assert current.digest == artifact.sha256


def test_samples_of_another_model_roll_back_on_the_device(
    fleet: Fleet, catalog: ArtifactCatalog, tmp_path: Path
) -> None:
    vset = _vset()
    model_a, model_b = tiny_model(1, pad_bytes=9000), tiny_model(2, pad_bytes=9000)
    v1 = catalog.add_from_onnx(
        "tiny", class_name=PROFILE.name, onnx_path=_add(catalog, fleet, tmp_path, model_a, "a.onnx"), validation=vset
    )
    agent = fleet.start_agent("dev-w")
    fleet.controller.deploy("dev-w", catalog.signed_manifest(v1), job_id="job-1")
    assert fleet.controller.wait_final("dev-w", "job-1").state.value == "active"
    # v2 is model B's artifact made the same way, but its samples and tolerances are model A's, re-signed.
    v2 = catalog.add_from_onnx(
        "tiny", class_name=PROFILE.name, onnx_path=_add(catalog, fleet, tmp_path, model_b, "b.onnx"), validation=vset
    )
    samples_a, tolerances_a = build_validation(model_a, vset)
    manifest_b = catalog.signed_manifest(v2).manifest
    assert manifest_b.validation_samples != samples_a
    forged = manifest_b.model_copy(update={"validation_samples": samples_a, "tolerances": tolerances_a})
    assert catalog.signing_key is not None
    fleet.controller.deploy("dev-w", sign_manifest(forged, catalog.signing_key), job_id="job-2")
    event = fleet.controller.wait_final("dev-w", "job-2")
    assert (event.state.value, event.result) == ("rolled_back", ResultCode.VALIDATION_FAILED)
    assert event.model_version == 1
    current = agent.slots.current()
    assert current is not None
    assert current.digest == v1.sha256
    x = np.ones((1, 4), dtype=np.float32)
    np.testing.assert_allclose(agent.infer(x).outputs, _run(model_a, x), rtol=1e-5)  # still model A


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])
