"""Device and job state changes from births, status messages and job events, each one transaction.

Nothing here assumes a single controller: a replica that sees an older message than the database holds
leaves the newer state alone (births and status compare the connection time, job events stop at a final state).
"""

from __future__ import annotations

import datetime as dt

from edgefleet.controller.data.db import Database
from edgefleet.controller.data.tables import DeploymentJob, Device
from edgefleet.protocols.codes import JobState, ResultCode
from edgefleet.protocols.messages import Birth, DeviceState, JobEvent, Status

__all__ = ["ENDED_JOB_STATES", "FINAL_JOB_STATES", "apply_birth", "apply_job_event", "apply_status"]

# A job has finished once active, failed or rolled back; an active one may still roll back in probation.
FINAL_JOB_STATES = frozenset({JobState.ACTIVE.value, JobState.FAILED.value, JobState.ROLLED_BACK.value})
ENDED_JOB_STATES = frozenset({JobState.FAILED.value, JobState.ROLLED_BACK.value})


def apply_birth(db: Database, device_id: str, birth: Birth, *, now: dt.datetime) -> None:
    with db.transaction(f"recording the birth of {device_id}") as session:
        device = session.get(Device, device_id, with_for_update=True)
        if device is None:
            return
        if device.connected_at is not None and birth.timestamp < device.connected_at:
            return  # an older connection's birth, delivered late
        device.online = True
        device.connected_at = birth.timestamp
        device.first_seen = device.first_seen or now
        device.last_seen = now
        if birth.running is not None:
            device.model_digest = birth.running.digest
            device.model_version = birth.running.version
        device.slot_state = birth.slots.model_dump_json()
        session.add(device)


def apply_status(db: Database, device_id: str, status: Status, *, now: dt.datetime) -> None:
    with db.transaction(f"recording the status of {device_id}") as session:
        device = session.get(Device, device_id, with_for_update=True)
        if device is None:
            return
        if status.state is DeviceState.ONLINE:
            if device.connected_at is None or status.timestamp >= device.connected_at:
                device.online = True
                device.connected_at = status.timestamp
                device.first_seen = device.first_seen or now
                device.last_seen = now
        elif device.connected_at is None or status.timestamp >= device.connected_at:
            # The last will carries the time its connection started: only that connection's end counts.
            device.online = False
        session.add(device)


def apply_job_event(db: Database, device_id: str, event: JobEvent, *, now: dt.datetime) -> bool:
    """Record the event; False when the job does not exist or is not this device's."""
    with db.transaction(f"recording job event {event.job_id}") as session:
        job = session.get(DeploymentJob, event.job_id, with_for_update=True)
        if job is None or job.device_id != device_id:
            return False
        if job.state in ENDED_JOB_STATES:
            return True  # a redelivered or late event after the job ended changes nothing
        job.state = event.state.value
        job.result_code = ResultCode(event.result).name.lower()
        job.detail = event.detail or job.detail
        job.updated_at = now
        if event.state.value in FINAL_JOB_STATES:
            job.finished_at = now
        session.add(job)
        device = session.get(Device, device_id)
        if device is not None:
            device.last_seen = now
            if event.state is JobState.ACTIVE and event.model_version is not None:
                device.model_version = event.model_version
                device.model_digest = event.artifact_sha256 or device.model_digest
            elif event.state is JobState.ROLLED_BACK and event.model_version is not None:
                # the event names the model running after the rollback (its digest comes with the next birth)
                if device.model_version != event.model_version:
                    device.model_digest = None
                device.model_version = event.model_version
            session.add(device)
    return True
