"""Device profiles: what a device class can hold and run, read from TOML files.

A profile is part of the wire contract because agents report the same capabilities in their birth message
and because the planner, the controller and the agent must agree on what "fits" means.

A profile file has one `[profile]` table (other tables, such as a recompression `[policy]`, belong to
other readers)::

    [profile]
    name = "rpi4"
    storage_budget_bytes = 2_000_000
    ram_budget_bytes = 134_217_728
    latency_budget_ms = 5.0
    threads = 4
    int8_dot_product = false
    max_accuracy_drop = 0.01
    onnxruntime_version = "1.17"
    opset = 17

    [profile.reference_ms]      # the device's times on the reference workload at `threads` threads
    fp32_conv = 1.6             # (`edgefleet-agent speed-factor --threads 4` on one device prints this table)
    fp32_matmul = 0.45
    int8_conv = 1.9
    int8_matmul = 0.55

A device's speed is a fact about the device: `reference_ms` holds its times on the fixed reference workload
(agent/workload/), and whoever predicts or simulates the device times the same workload on its own host and scales
by device / host for the model's path (`device_over_host`). `speed_correction` is what the field taught since:
observed p95 over predicted p95, kept by the recompression loop.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.protocols.errors import ProfileError, describe_problems

__all__ = ["DeviceProfile", "ReferenceTimes", "load_profile", "parse_profile", "read_profile_file"]

MAX_PROFILE_FILE_BYTES = 64 * 1024
_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


_Millis = Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False)]


class ReferenceTimes(BaseModel):
    """Median milliseconds of one run of each reference model (agent/workload/) on one CPU at some thread count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fp32_conv: _Millis
    fp32_matmul: _Millis
    int8_conv: _Millis
    int8_matmul: _Millis

    def path(self, *, int8: bool) -> tuple[float, float]:
        return (self.int8_conv, self.int8_matmul) if int8 else (self.fp32_conv, self.fp32_matmul)


class DeviceProfile(BaseModel):
    """What one device class can store, hold in RAM and compute, and how good its model must stay."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=_NAME, description="device class name, lower case")]
    description: Annotated[str, Field(max_length=500)] = ""
    storage_budget_bytes: Annotated[int, Field(gt=0, description="flash/disk the model file may take")]
    ram_budget_bytes: Annotated[int, Field(gt=0, description="peak RSS of a process running the model")]
    latency_budget_ms: Annotated[float, Field(gt=0, description="p95 latency of one inference on the device")]
    threads: Annotated[int, Field(ge=1, le=256, description="intra-op threads onnxruntime uses on the device")]
    int8_dot_product: Annotated[
        bool, Field(description="CPU has int8 dot-product instructions (x86 VNNI, ARM dotprod)")
    ]
    reference_ms: Annotated[
        ReferenceTimes,
        Field(description="the device's times on the reference workload at `threads` threads (speed-factor)"),
    ]
    speed_correction: Annotated[
        float,
        Field(gt=0, le=1000, allow_inf_nan=False, description="field p95 / predicted p95, learned from telemetry"),
    ] = 1.0
    accuracy_floor: Annotated[float | None, Field(ge=0, le=1, description="absolute accuracy floor")] = None
    max_accuracy_drop: Annotated[
        float | None, Field(ge=0, le=1, description="largest accepted drop versus fp32, as a fraction")
    ] = None
    onnxruntime_version: Annotated[str, Field(pattern=r"^\d+\.\d+(\.\d+)?$")] = "1.17"
    opset: Annotated[int, Field(ge=7, le=30, description="highest ONNX opset the device runtime supports")] = 17
    block_size_bytes: Annotated[
        int, Field(ge=4096, le=131072, description="artifact block size for transfers to this class")
    ] = 32768

    @model_validator(mode="before")
    @classmethod
    def _no_host_ratio(cls, data: Any) -> Any:
        if isinstance(data, dict) and "speed_factor" in data:
            raise ValueError(
                "speed_factor (a ratio to one host's CPU) is no longer read: time a device with "
                "`edgefleet-agent speed-factor --threads N` and put the table it prints in [profile.reference_ms]"
            )
        return data

    @model_validator(mode="after")
    def _one_accuracy_rule(self) -> Self:
        if self.accuracy_floor is None and self.max_accuracy_drop is None:
            object.__setattr__(self, "max_accuracy_drop", 0.01)
        return self

    def required_accuracy(self, fp32_accuracy: float) -> float:
        """The accuracy a candidate must reach, given the fp32 model's accuracy on the same data."""
        floors = [0.0]
        if self.accuracy_floor is not None:
            floors.append(self.accuracy_floor)
        if self.max_accuracy_drop is not None:
            floors.append(fp32_accuracy - self.max_accuracy_drop)
        return max(floors)

    def device_over_host(self, host: ReferenceTimes, *, int8: bool) -> float:
        """How many times longer the device takes than `host` on the model path (fp32, or int8), before the field's
        correction: the geometric mean of device / host over the path's two reference models.

        Both sides are medians of the same models, the device at its `threads`, the host at whatever thread count it
        was timed at (the planner and the simulator time one thread: a shared host's multi-threaded times measure
        its neighbours more than the model).
        """
        pairs = zip(self.reference_ms.path(int8=int8), host.path(int8=int8), strict=True)
        return math.exp(sum(math.log(device / host_ms) for device, host_ms in pairs) / 2)

    def predict_ms(self, host_ms: float, host: ReferenceTimes, *, int8: bool) -> float:
        """The device p95 of a model whose p95 on `host` is `host_ms`: host x device/host x the field's correction."""
        return host_ms * self.device_over_host(host, int8=int8) * self.speed_correction

    def onnxruntime_tuple(self) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", self.onnxruntime_version))


def parse_profile(data: dict[str, Any], *, source: str = "<profile>") -> DeviceProfile:
    """Validate a parsed TOML document (its `[profile]` table); errors name the field and the source."""
    table = data.get("profile")
    if not isinstance(table, dict):
        raise ProfileError(f"{source}: no [profile] table")
    try:
        return DeviceProfile.model_validate(table)
    except ValidationError as exc:
        raise ProfileError(f"{source}: {describe_problems(exc, subject='profile')}") from exc


def read_profile_file(path: Path | str) -> dict[str, Any]:
    """The parsed TOML document of a class profile file (its `[profile]` table and any others, e.g. `[policy]`).

    Reads at most one byte over `MAX_PROFILE_FILE_BYTES`, so /dev/zero or a huge file is refused, not read whole.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PROFILE_FILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile file ({exc.strerror or exc})") from exc
    if len(raw) > MAX_PROFILE_FILE_BYTES:
        raise ProfileError(f"{path}: profile file is more than {MAX_PROFILE_FILE_BYTES} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})") from exc


def load_profile(path: Path | str) -> DeviceProfile:
    """Read a profile TOML file. Raises `ProfileError` naming the file and the field that is wrong."""
    return parse_profile(read_profile_file(path), source=str(path))
