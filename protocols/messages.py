"""Device → controller messages about the device itself: birth, retained status and job events."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from edgefleet.protocols.codes import JobState, ResultCode
from edgefleet.protocols.wire import (
    DeviceClass,
    Digest,
    Identifier,
    Message,
    ShortText,
    UtcDatetime,
    VersionString,
    WireModel,
)

__all__ = ["Birth", "Capabilities", "DeviceState", "JobEvent", "RunningModel", "SlotState", "Status"]

_PROVIDER = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$")]


class Capabilities(WireModel):
    """What the device's runtime and hardware offer; checked against a manifest before a deploy."""

    onnxruntime_version: VersionString
    providers: Annotated[tuple[_PROVIDER, ...], Field(min_length=1, max_length=16)] = ("CPUExecutionProvider",)
    opset: Annotated[int, Field(ge=7, le=30, description="highest ONNX opset the runtime supports")]
    cpu_model: ShortText = ""
    cpu_count: Annotated[int, Field(ge=1, le=4096)]
    ram_bytes: Annotated[int, Field(gt=0, le=2**50)]
    threads: Annotated[int, Field(ge=1, le=256, description="intra-op threads the agent gives onnxruntime")]
    int8_dot_product: bool = Field(description="CPU has int8 dot-product instructions (VNNI, dotprod)")
    free_storage_bytes: Annotated[int | None, Field(ge=0, le=2**50)] = None


class RunningModel(WireModel):
    """A model held in a slot: its name, artifact digest and version."""

    name: Identifier
    digest: Digest
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]


class SlotState(WireModel):
    """The two model slots and which one is active (None before the first deploy)."""

    active: Literal["a", "b"] | None = None
    a: RunningModel | None = None
    b: RunningModel | None = None

    @model_validator(mode="after")
    def _active_slot_is_filled(self) -> Self:
        if self.active is not None and getattr(self, self.active) is None:
            raise ValueError(f"active: slot {self.active!r} is empty")
        return self


class Birth(Message):
    """Sent by a device on every connect: who it is, what it can run and what it runs now."""

    agent_version: VersionString
    device_class: DeviceClass
    fleet: Identifier
    capabilities: Capabilities
    running: RunningModel | None = None
    slots: SlotState = SlotState()
    job_id: Identifier | None = Field(None, description="the job in progress, if any")
    job_state: JobState = JobState.IDLE
    timestamp: UtcDatetime


class DeviceState(StrEnum):
    """Retained connection state of a device."""

    ONLINE = "online"
    OFFLINE = "offline"


class Status(Message):
    """Retained on the status topic; the `offline` one is the device's last will (timestamp: when it connected)."""

    state: DeviceState
    timestamp: UtcDatetime


class JobEvent(Message):
    """Progress of one job on one device; `result` is a `ResultCode` number (0 = ok)."""

    job_id: Identifier
    state: JobState
    progress: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    result: ResultCode = ResultCode.OK
    detail: Annotated[str, Field(max_length=500)] = ""
    timestamp: UtcDatetime
    model_version: Annotated[int | None, Field(ge=1, le=2**31 - 1)] = Field(
        None, description="version of the model active on the device after this event"
    )
    artifact_sha256: Digest | None = None

    @model_validator(mode="after")
    def _failure_has_a_code(self) -> Self:
        if self.state is JobState.FAILED and self.result is ResultCode.OK:
            raise ValueError("result: a failed job needs a non-zero result code")
        return self
