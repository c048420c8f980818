"""On-disk cache of measured candidates, keyed by the content hash of (model, data, recipe, measurement settings).

Each entry is two files written atomically (`<key>.onnx`, then `<key>.json`, so a reader that sees the JSON sees the
model): a crash leaves at worst an orphan model file, never a half entry. What is cached does not depend on the
device profile (budgets are judged after reading), so plans for several profiles of the same model share entries.
A corrupt entry counts as a miss and is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from edgefleet.compression.measure import Measurement
from edgefleet.compression.sources import write_atomic
from edgefleet.compression.task import Task

__all__ = ["CACHE_VERSION", "CachedResult", "PlanCache", "content_key", "task_digest"]

log = logging.getLogger(__name__)
CACHE_VERSION = "plan-cache-1"


def task_digest(task: Task) -> str:
    """sha256 over the task's arrays (shapes, dtypes and bytes) and class count."""
    digest = hashlib.sha256(f"{task.num_classes}".encode())
    for array in (task.x_train, task.y_train, task.x_val, task.y_val):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def content_key(*parts: str | bytes) -> str:
    """sha256 of the parts, each length-prefixed so that ('ab', 'c') and ('a', 'bc') differ."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """What a candidate costs and how it does, independent of any profile."""

    artifact: bytes
    measurement: Measurement
    correct: npt.NDArray[np.bool_]
    notes: tuple[str, ...]
    seconds: float


class PlanCache:
    """A folder of cached candidate results; `hits` and `misses` count lookups since this object was made."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.onnx", folder / f"{key}.json"

    def get(self, key: str) -> CachedResult | None:
        model_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            artifact = model_path.read_bytes()
            result = CachedResult(
                artifact=artifact,
                measurement=Measurement.model_validate(meta["measurement"]),
                correct=np.frombuffer(bytes.fromhex(meta["correct"]), dtype=np.uint8).astype(bool),
                notes=tuple(str(n) for n in meta.get("notes", [])),
                seconds=float(meta.get("seconds", 0.0)),
            )
            intact = hashlib.sha256(artifact).hexdigest() == meta["sha256"]
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            log.warning("plan cache entry %s is unreadable (%s); recomputing it", key, exc)
            self.misses += 1
            return None
        if not intact:
            log.warning("plan cache entry %s does not match its digest; recomputing it", key)
            self.misses += 1
            return None
        self.hits += 1
        return result

    def put(self, key: str, result: CachedResult) -> None:
        model_path, meta_path = self._paths(key)
        meta = {
            "version": CACHE_VERSION,
            "sha256": hashlib.sha256(result.artifact).hexdigest(),
            "measurement": result.measurement.model_dump(mode="json"),
            "correct": result.correct.astype(np.uint8).tobytes().hex(),
            "notes": list(result.notes),
            "seconds": result.seconds,
        }
        try:
            write_atomic(model_path, result.artifact)
            write_atomic(meta_path, json.dumps(meta).encode())
        except OSError as exc:
            log.warning("cannot write plan cache entry %s (%s); planning goes on without it", key, exc)

    def entries(self) -> int:
        """How many complete entries the folder holds."""
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0
