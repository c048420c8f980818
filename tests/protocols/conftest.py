"""Builders for valid wire messages, shared by the protocol tests (a fixed key, so signatures are stable)."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet.protocols import (
    LATENCY_BUCKETS_SECONDS,
    Birth,
    Capabilities,
    DeployCommand,
    InlineTensor,
    JobEvent,
    JobState,
    Manifest,
    RunningModel,
    SignedManifest,
    SlotState,
    Status,
    TelemetryBatch,
    TensorSpec,
    block_digests,
    key_id,
    public_key_of,
    sign_manifest,
)

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
# A fixed test key (never used outside tests) so that golden signed manifests stay verifiable.
PRIVATE_KEY = hashlib.sha256(b"edgefleet test signing key").digest()
PUBLIC_KEY = public_key_of(PRIVATE_KEY)
KEY_ID = key_id(PUBLIC_KEY)
# 17,920 pseudo-random bytes: four full 4 KiB blocks (all different) and a short fifth one
ARTIFACT = b"".join(hashlib.sha256(i.to_bytes(2, "big")).digest() for i in range(560))


def make_manifest(*, version: int = 3, data: bytes = ARTIFACT, expires_at: datetime | None = None) -> Manifest:
    floats = struct.pack("<4f", 0.5, -1.0, 2.25, 0.0)
    return Manifest(
        artifact_name="mnist-int8-rpi4",
        model_name="mnist",
        device_class="rpi4",
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        block_size=4096,
        block_sha256=block_digests(data, 4096),
        created_at=NOW - timedelta(hours=1),
        expires_at=expires_at or datetime(2099, 1, 1, tzinfo=UTC),
        key_id=KEY_ID,
        inputs=(TensorSpec(name="input", dtype="float32", shape=("batch", 4)),),
        outputs=(TensorSpec(name="logits", dtype="float32", shape=("batch", 4)),),
        validation_samples=(
            {
                "inputs": {"input": InlineTensor.from_bytes(floats, dtype="float32", shape=(1, 4))},
                "expected": {"logits": InlineTensor.from_bytes(floats, dtype="float32", shape=(1, 4))},
                "label": 2,
            },
        ),
        latency_budget_ms=5.0,
        metrics={"accuracy": 0.981, "size_bytes": float(len(data)), "latency_p95_ms": 1.25},
        recipe=({"pass": "quantize_static", "params": {"per_channel": True, "calibration": 128}},),
        opset=17,
        min_onnxruntime_version="1.17",
    )


def make_signed(**kwargs: object) -> SignedManifest:
    return sign_manifest(make_manifest(**kwargs), PRIVATE_KEY)  # type: ignore[arg-type]


def make_birth() -> Birth:
    running = RunningModel(name="mnist", digest="ab" * 32, version=2)
    return Birth(
        agent_version="0.1.0",
        device_class="rpi4",
        fleet="plant-a",
        capabilities=Capabilities(
            onnxruntime_version="1.20.1",
            providers=("CPUExecutionProvider",),
            opset=21,
            cpu_model="Cortex-A72",
            cpu_count=4,
            ram_bytes=4 * 2**30,
            threads=4,
            int8_dot_product=False,
        ),
        running=running,
        slots=SlotState(active="a", a=running),
        timestamp=NOW,
    )


def make_telemetry(*, seq: int = 0) -> TelemetryBatch:
    counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
    counts[5], counts[6] = 90, 10
    return TelemetryBatch(
        session="a1b2c3d4",
        seq=seq,
        window_start=NOW,
        window_end=NOW + timedelta(seconds=60),
        model_name="mnist",
        model_digest="ab" * 32,
        model_version=2,
        inference_count=100,
        latency_counts=tuple(counts),
        latency_sum_seconds=0.21,
        labelled_count=20,
        correct_count=19,
        mean_top1_confidence=0.93,
        errors={"inference": 1},
        rss_bytes=52_000_000,
    )


def make_event() -> JobEvent:
    return JobEvent(job_id="job-42", state=JobState.DOWNLOADING, progress=0.4, timestamp=NOW, model_version=2)


def make_deploy() -> DeployCommand:
    return DeployCommand(job_id="job-42", issued_at=NOW, expires_at=NOW + timedelta(hours=1), manifest=make_signed())


def make_status() -> Status:
    return Status(state="online", timestamp=NOW)


class Samples:
    """The builders above, handed to tests as the `samples` fixture (tests cannot import conftest)."""

    now = NOW
    private_key = PRIVATE_KEY
    public_key = PUBLIC_KEY
    key_id = KEY_ID
    artifact = ARTIFACT
    manifest = staticmethod(make_manifest)
    signed = staticmethod(make_signed)
    birth = staticmethod(make_birth)
    telemetry = staticmethod(make_telemetry)
    event = staticmethod(make_event)
    deploy = staticmethod(make_deploy)
    status = staticmethod(make_status)


@pytest.fixture
def samples() -> type[Samples]:
    return Samples
