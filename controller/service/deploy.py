"""Direct deploys: record one job per target device, then publish a signed DeployCommand to each (QoS 1).

The jobs are rows before anything is sent (a restarted controller sees what it was doing); each publish that
the broker acknowledges moves its job from `queued` to `sent`, a failed one to `failed` with the reason.
The command expires with `expires_at` in its payload and, on MQTT 5, a message expiry, so a device that comes
back after a week does not install a stale command. Waves and health gates are the rollout issue's work.

Example::

    results = Deployer(db, catalog=catalog, publisher=mqtt_client).deploy("rpi4:3", class_name="rpi4")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from sqlmodel import col, select

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.states import JobRecordState
from edgefleet.controller.data.tables import AuditEntry, DeploymentJob, Device, utcnow
from edgefleet.controller.errors import ControllerError, NotFoundError, RegistryError
from edgefleet.protocols.codec import encode
from edgefleet.protocols.codes import JobState
from edgefleet.protocols.commands import DeployCommand
from edgefleet.protocols.manifest import SignedManifest
from edgefleet.protocols.topics import command_topic

__all__ = ["DeployResult", "Deployer", "Publisher"]


class Publisher(Protocol):
    """What a deploy needs from MQTT (`MqttClient` is one)."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        timeout: float | None = 10.0,
    ) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class DeployResult:
    job_id: str
    device_id: str
    state: str
    error: str | None = None


class Deployer:
    def __init__(
        self,
        db: Database,
        *,
        catalog: ArtifactCatalog,
        publisher: Publisher,
        actor: str = "operator",
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.publisher = publisher
        self.actor = actor
        self.clock = clock

    def _targets(self, class_name: str, device_ids: Sequence[str] | None, target_class: str | None) -> list[Device]:
        with self.db.reading("choosing deploy targets") as session:
            if device_ids:
                rows = list(session.exec(select(Device).where(col(Device.id).in_(list(device_ids)))).all())
                missing = sorted(set(device_ids) - {d.id for d in rows})
                if missing:
                    raise NotFoundError(f"device(s) not registered: {', '.join(missing[:10])}")
            else:
                rows = list(session.exec(select(Device).where(Device.class_name == target_class)).all())
        wrong = sorted(d.id for d in rows if d.class_name != class_name)
        if wrong:
            raise RegistryError(
                f"the artifact is built for class {class_name}; device(s) {', '.join(wrong[:10])} are of another class"
            )
        if not rows:
            raise NotFoundError(f"no devices in class {target_class or class_name} to deploy to")
        return rows

    def deploy(
        self,
        artifact_ref: str | int,
        *,
        device_ids: Sequence[str] | None = None,
        class_name: str | None = None,
        expires_in: dt.timedelta = dt.timedelta(hours=24),
        publish_timeout: float = 10.0,
    ) -> list[DeployResult]:
        """Deploy to the listed devices or to every device of a class; returns each job's outcome."""
        if bool(device_ids) == (class_name is not None):
            raise RegistryError("deploy to either --device IDs or --class NAME, not both or neither")
        artifact = self.catalog.get(artifact_ref)
        signed = self.catalog.signed_manifest(artifact)
        now = self.clock()
        expires_at = min(now + expires_in, signed.manifest.expires_at)
        if expires_at <= now:
            raise RegistryError(f"artifact {artifact.id}'s manifest expired at {signed.manifest.expires_at}")
        devices = self._targets(artifact.class_name, device_ids, class_name)
        jobs = {d.id: uuid.uuid4().hex for d in devices}
        with self.db.transaction(f"recording deploy jobs for artifact {artifact.id}") as session:
            for device in devices:
                session.add(
                    DeploymentJob(
                        id=jobs[device.id],
                        device_id=device.id,
                        artifact_id=artifact.id or 0,
                        state=JobRecordState.QUEUED.value,
                        created_at=now,
                        updated_at=now,
                    )
                )
            session.add(
                AuditEntry(
                    at=now,
                    actor=self.actor,
                    action="deploy",
                    target=f"artifact {artifact.id}",
                    detail_json=json.dumps({"devices": len(devices), "class": artifact.class_name}),
                )
            )
        results = self._publish_all(devices, jobs, signed, now=now, expires_at=expires_at, timeout=publish_timeout)
        self._record_sends(results)
        return results

    def _publish_all(
        self,
        devices: list[Device],
        jobs: dict[str, str],
        signed: SignedManifest,
        *,
        now: dt.datetime,
        expires_at: dt.datetime,
        timeout: float,
    ) -> list[DeployResult]:
        results = []
        for device in devices:
            command = DeployCommand(job_id=jobs[device.id], issued_at=now, expires_at=expires_at, manifest=signed)
            try:
                self.publisher.publish(
                    command_topic(device.fleet, device.id),
                    encode(command),
                    qos=1,
                    expiry_s=int((expires_at - now).total_seconds()),
                    timeout=timeout,
                )
                results.append(DeployResult(jobs[device.id], device.id, JobRecordState.SENT.value))
            except ControllerError as exc:
                results.append(DeployResult(jobs[device.id], device.id, JobState.FAILED.value, str(exc)))
        return results

    def _record_sends(self, results: list[DeployResult]) -> None:
        now = self.clock()
        with self.db.transaction("recording deploy publishes") as session:
            for result in results:
                job = session.get(DeploymentJob, result.job_id)
                if job is None or job.state != JobRecordState.QUEUED.value:
                    continue  # the device already reported progress
                job.state = result.state
                job.detail = result.error
                job.updated_at = now
                if result.state == JobState.FAILED.value:
                    job.finished_at = now
                session.add(job)
