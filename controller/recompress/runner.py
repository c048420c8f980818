"""The recompression loop in the controller process: a timer thread for `RecompressionLoop.step`, one build thread.

`step` only reads telemetry and writes a few rows, so it runs every `interval_s` on its own thread, like the rollout
runner. A build (planning a model takes 10-150 s) runs on a second thread, one at a time: the timer, the rollout
runner and telemetry ingest never wait for it. While the build thread is busy, other recompressions in `building`
wait for the next step.

When it starts, the runner calls `RecompressionLoop.recover`: a build interrupted by a controller stop (one whose
`begin_build` mark is set; those still waiting are not touched) is retried once, then marked failed (see
controller/recompress/loop.py). `stop` joins both threads in bounded time; a build still running
then is abandoned (its thread is a daemon, its result is not recorded) and retried at the next start.

`default_builder` is the controller's compression worker: `PlannerBuilder` over the registry's example models, signing
with the controller key (`edgefleet init`); without the key each build fails with a clear note, nothing crashes.

Example::

    loop = RecompressionLoop(db, builder=default_builder(settings, db))
    runner = RecompressionRunner(loop, interval_s=5.0)
    runner.start()
    ...
    runner.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from edgefleet.controller.config import Settings
from edgefleet.controller.data.db import Database
from edgefleet.controller.errors import ControllerError
from edgefleet.controller.periodic import Periodic
from edgefleet.controller.recompress.loop import Builder, BuildRequest, BuildResult, RecompressionLoop

__all__ = ["RecompressionRunner", "default_builder"]

log = logging.getLogger(__name__)


def default_builder(settings: Settings, db: Database, *, options: Any | None = None) -> Builder:
    """The planner worker of `settings`: signing key, artifact store and work folder under the controller home.

    Everything is resolved at build time, so a controller without a signing key starts; the build then fails with
    "no signing key at ...: run `edgefleet init` first" recorded on the recompression.
    """

    def build(request: BuildRequest) -> BuildResult:
        from edgefleet.controller.artifacts.catalog import ArtifactCatalog
        from edgefleet.controller.artifacts.keys import load_signing_key
        from edgefleet.controller.artifacts.store import ArtifactStore
        from edgefleet.controller.data.registry import Registry
        from edgefleet.controller.recompress.worker import PlannerBuilder, example_loader

        key = load_signing_key(settings.key_path)
        catalog = ArtifactCatalog(db, store=ArtifactStore(settings.store_dir), signing_key=key, actor="recompression")
        worker = PlannerBuilder(
            catalog, load_model=example_loader(Registry(db)), workdir=settings.home / "work", options=options
        )
        return worker(request)

    return build


class RecompressionRunner:
    """Steps the loop every `interval_s` on one thread and runs its builds on another (one at a time)."""

    def __init__(self, loop: RecompressionLoop, *, interval_s: float = 5.0) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 (got {interval_s})")
        self.loop = loop
        self.interval_s = interval_s
        self.builds = 0
        self._lock = threading.Lock()
        self._building: int | None = None  # the recompression id on the build thread
        self._recovered = False
        self._periodic = Periodic(self._step, interval_s=interval_s, name="edgefleet-recompress")
        self._worker: threading.Thread | None = None
        loop.submit = self._submit

    @property
    def steps(self) -> int:
        return self._periodic.steps

    @property
    def failures(self) -> int:
        return self._periodic.failures

    @property
    def building(self) -> int | None:
        """The recompression being built now, if any."""
        return self._building

    def start(self) -> None:
        self._periodic.start()

    def wake(self) -> None:
        self._periodic.wake()

    def _step(self) -> None:
        if not self._recovered:  # builds a stopped controller left behind, once per start
            self.loop.recover()
            self._recovered = True
        self.loop.step()

    def _submit(self, request: BuildRequest) -> bool:
        with self._lock:
            if self._periodic.stopping or self._building is not None:
                return False
            self._building = request.recompression_id
            self._worker = threading.Thread(
                target=self._build, args=(request,), name=f"edgefleet-build-{request.recompression_id}", daemon=True
            )
            self._worker.start()
        log.info("recompression %s: building for class %s", request.recompression_id, request.class_name)
        return True

    def _build(self, request: BuildRequest) -> None:
        started = time.monotonic()
        builder = self.loop.builder
        try:
            if builder is None:
                self.loop.fail(request.recompression_id, "no compression worker is attached")
                return
            if not self.loop.begin_build(request.recompression_id):
                return  # recorded (or rejected) since the step listed it: the last build's result is in
            try:
                result = builder(request)
            except Exception as exc:  # any failure ends this recompression, not the controller
                if not self._periodic.stopping:
                    if isinstance(exc, ControllerError):  # an expected refusal (no key, no model): no traceback
                        log.warning("recompression %s: the build failed: %s", request.recompression_id, exc)
                    else:
                        log.exception("recompression %s: the build failed", request.recompression_id)
                    self.loop.fail(request.recompression_id, f"build failed: {exc}")
                return
            if self._periodic.stopping:  # stopped meanwhile: the row stays building and the next start retries it
                log.warning("recompression %s: build finished after stop; not recorded", request.recompression_id)
                return
            self.loop.record_build(request.recompression_id, result)
            self.builds += 1
            log.info(
                "recompression %s: built in %.0f s (artifact %s)",
                request.recompression_id,
                time.monotonic() - started,
                result.artifact_id,
            )
        except Exception:  # recording failed (database down): the row stays building, the next step builds it again
            log.exception("recompression %s: recording the build failed", request.recompression_id)
        finally:
            with self._lock:
                self._building = None
            if not self._periodic.stopping:
                self._periodic.wake()  # the next step follows up now (auto approval, the next build)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop stepping; wait at most `timeout` seconds in all (a running build is abandoned, see the module doc)."""
        deadline = time.monotonic() + timeout
        self._periodic.stop(timeout=timeout)
        with self._lock:
            worker = self._worker
        if worker is not None:
            worker.join(max(0.0, min(1.0, deadline - time.monotonic())))
            if worker.is_alive():
                log.warning(
                    "recompression %s: build still running at stop; abandoned, retried at the next start",
                    self._building,
                )
