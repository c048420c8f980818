"""The demo's compression worker for the recompression loop: the first rung of the ladder that fits the field.

The controller's loop calls it (on its build thread) with the class profile and why it triggered. It measures how
much slower the class runs now than before the problem (its recent p95 over the p95 the demo recorded as the
baseline), predicts each rung's field p95 at that speed from the rungs' host latencies (compute does not depend on
the weights, so untrained networks are timed), and compresses the most accurate rung predicted to fit the budget
with a margin. The result is signed, with validation samples, as the class's next artifact. `progress` tells the
demo's live view what it is doing.

Example::

    builder = LadderBuilder(app, trained=trained, model_name="digits", build_dir=home / "build")
    builder.baseline["rpi4"] = 0.9     # ms, the class's p95 before the problem
    app = ControllerApp(settings, recompress_builder=builder)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.controller.artifacts.validation_set import ValidationSet
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.tables import Artifact
from edgefleet.controller.demo.models import (
    LADDER,
    CompressMode,
    TrainedModel,
    compress_for_class,
    host_times,
    recipe_width,
    width_latency_ms,
)
from edgefleet.controller.demo.setup import sign_artifact
from edgefleet.controller.demo.story import recent_p95_ms
from edgefleet.controller.recompress.loop import BuildRequest, BuildResult
from edgefleet.controller.service.app import ControllerApp

__all__ = ["BuildProgress", "LadderBuilder", "choose_rung"]

log = logging.getLogger(__name__)

FIT_MARGIN = 1.5
"""A rung is chosen when its predicted field p95 times this stays within the budget: the recompressed model must fit
clearly (a p95 of a few dozen samples on a busy host moves by tens of percent), not just at the edge."""


@dataclass(slots=True)
class BuildProgress:
    """What the builder is doing, for the live view (read from another thread: plain values only)."""

    class_name: str | None = None
    stage: str = ""
    started: float = 0.0


def choose_rung(
    *, base_p95_ms: float, slowdown: float, device_over_host: float, current_host_ms: float,
    rung_host_ms: list[float], budget_ms: float, margin: float = FIT_MARGIN,
) -> tuple[int, list[float]]:  # fmt: skip
    """The first rung predicted to fit, and every rung's prediction (the last rung when none fits).

    A rung's field p95 = (the class's baseline p95 + the difference in host compute scaled by the class's
    device/host ratio on the reference workload) times the slowdown: the part of the baseline that is not the
    model's compute stays as it was.
    """
    predicted = [(base_p95_ms + (h - current_host_ms) * device_over_host) * slowdown for h in rung_host_ms]
    for index, value in enumerate(predicted):
        if value * margin <= budget_ms:
            return index, predicted
    return len(rung_host_ms) - 1, predicted


class LadderBuilder:
    """A `Builder` (BuildRequest -> BuildResult) for `RecompressionLoop`, see the module docstring."""

    def __init__(
        self,
        app: ControllerApp,
        *,
        trained: Callable[[], TrainedModel | None],
        validation: ValidationSet | None,
        model_name: str,
        build_dir: Path,
        window_s: float = 10.0,
    ) -> None:
        self.app = app
        self.trained = trained
        self.validation = validation
        self.model_name = model_name
        self.build_dir = build_dir
        self.window_s = window_s
        self.baseline: dict[str, float] = {}  # class -> p95 ms before the problem
        self.progress = BuildProgress()
        self.builds: list[dict[str, Any]] = []  # the report of every build, in order
        self._lock = threading.Lock()

    @property
    def db(self) -> Database:
        return self.app.db

    def _stage(self, text: str) -> None:
        self.progress.stage = text
        log.info("recompression build: %s", text)

    def __call__(self, request: BuildRequest) -> BuildResult:
        with self._lock:
            self.progress = BuildProgress(class_name=request.class_name, stage="starting", started=time.monotonic())
            try:
                return self._build(request)
            finally:
                self.progress.class_name = None

    def _build(self, request: BuildRequest) -> BuildResult:
        trained = self.trained()
        if trained is None:
            raise RuntimeError("the demo has not trained its model yet")
        profile = request.profile
        with self.db.reading("reading the artifact to replace") as session:
            current = session.get(Artifact, request.from_artifact_id)
        if current is None:
            raise RuntimeError(f"artifact {request.from_artifact_id} is gone")
        recipe = {"passes": json.loads(current.recipe_json or "[]")}
        current_width = recipe_width(recipe) if recipe["passes"] else 1.0
        now_p95 = recent_p95_ms(self.db, request.class_name, version=current.version, seconds=self.window_s)
        base = self.baseline.get(request.class_name)
        slowdown = now_p95 / base if now_p95 is not None and base else 1.0
        base_p95 = base or (now_p95 or profile.latency_budget_ms)
        self._stage(f"timing the ladder's rungs (field p95 {now_p95 or 0:.2f} ms, {slowdown:.1f}x the baseline)")
        widths = [recipe_width(r) for r in LADDER]
        host = {w: width_latency_ms(w) for w in {*widths, current_width}}
        index, predicted = choose_rung(
            base_p95_ms=base_p95,
            slowdown=max(1.0, slowdown),
            device_over_host=profile.predict_ms(1.0, host_times(), int8=False),
            current_host_ms=host[current_width],
            rung_host_ms=[host[w] for w in widths],
            budget_ms=profile.latency_budget_ms,
        )
        rung = LADDER[index]
        self._stage(f"compressing {rung['name']} (predicted p95 {predicted[index]:.2f} ms)")
        built = compress_for_class(trained, profile, mode=CompressMode.recipe, recipe=rung)
        self._stage(f"signing {rung['name']}")
        signed = sign_artifact(
            self.app,
            onnx=built.onnx,
            class_name=request.class_name,
            model_name=self.model_name,
            build_dir=self.build_dir,
            recipe=built.recipe,
            metrics=built.metrics,
            validation=self.validation,
            actor="recompression",
        )
        report: dict[str, Any] = {
            "recipe": rung["name"],
            "label": built.recipe_label,
            "width": widths[index],
            "field_p95_ms": now_p95,
            "baseline_p95_ms": base,
            "slowdown": round(slowdown, 2),
            "predicted_p95_ms": round(predicted[index], 3),
            "predicted_by_rung": {LADDER[i]["name"]: round(p, 3) for i, p in enumerate(predicted)},
            "budget_ms": profile.latency_budget_ms,
            "accuracy": built.metrics.get("accuracy"),
            "version": signed.version,
            "seconds": round(time.monotonic() - self.progress.started, 1),
        }
        self.builds.append({"class": request.class_name, **report})
        return BuildResult(signed.artifact_id, report)
