"""Runs update jobs through the state machine: each state's action, persisted before it runs, resumed on start.

The `Updater` owns the job record, the download and the slots; it talks to the outside only through an
`UpdateHost` (publish an event, ask for blocks, watch an artifact topic, reload the model), so it can be driven
by one real agent or by thousands of simulated ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.download import Download
from edgefleet.agent.errors import AgentError, SlotError, TransitionError, storage_code
from edgefleet.agent.intake import handle_command
from edgefleet.agent.jobstore import JobRecord, JobStore
from edgefleet.agent.machine import TERMINAL, Event, State, next_state
from edgefleet.agent.probation import Probation
from edgefleet.agent.reactor import Reactor, Timer
from edgefleet.agent.runner import ModelRunner
from edgefleet.agent.slots import Slots
from edgefleet.agent.steps import SimulatedCrashError, install_into_slot, verify_download, verify_signed
from edgefleet.agent.transfer import Fetcher
from edgefleet.agent.validate import validate_model
from edgefleet.protocols.blocks import Block, BlockRequest
from edgefleet.protocols.codes import JobState, ResultCode
from edgefleet.protocols.commands import ConfigureCommand, DeployCommand, RollbackCommand
from edgefleet.protocols.errors import ProtocolError, VerificationError
from edgefleet.protocols.manifest import Manifest, SignedManifest
from edgefleet.protocols.messages import JobEvent

__all__ = ["UpdateHost", "Updater"]

log = logging.getLogger(__name__)

_JOB_STATE: dict[State, JobState] = {s: JobState(s.value) for s in State if s is not State.ROLLING_BACK}


class UpdateHost(Protocol):
    """What the updater needs from the agent around it."""

    def publish_event(self, event: JobEvent) -> None: ...
    def send_block_request(self, request: BlockRequest) -> bool: ...
    def input_pending(self) -> bool: ...
    def watch_artifact(self, digest: str, *, on: bool) -> None: ...
    def model_changed(self, runner: ModelRunner | None = None) -> None: ...
    def load_runner(self, path: Path, digest: str) -> ModelRunner: ...
    def crash(self) -> None: ...
    def configure(self, command: ConfigureCommand) -> None: ...


class Updater:
    __slots__ = (
        "_crash_armed",
        "_probation",
        "_probation_timer",
        "_signed",
        "config",
        "fetcher",
        "host",
        "probation_s",
        "reactor",
        "record",
        "slots",
        "wall",
    )  # fmt: skip

    def __init__(
        self,
        config: AgentConfig,
        host: UpdateHost,
        reactor: Reactor,
        *,
        wall: Callable[[], datetime],
        slots: Slots,
    ) -> None:
        self.config = config
        self.host = host
        self.reactor = reactor
        self.wall = wall
        self.slots = slots
        self.record = JobRecord()
        self.fetcher: Fetcher | None = None
        self.probation_s = config.probation_s
        self._probation_timer: Timer | None = None
        self._probation: Probation | None = None
        self._signed: tuple[dict[str, Any], SignedManifest] | None = None
        self._crash_armed = config.faults.crash_during_install

    @property
    def store(self) -> JobStore:
        # built on use rather than held: one Path less per simulated device
        return JobStore(self.config.data_dir / "job.json", durable=self.config.durable)

    # -- the one place that changes state -------------------------------------------------------------------------
    def move(self, event: Event, *, result: ResultCode = ResultCode.OK, detail: str = "") -> None:
        rec = self.record
        try:
            target = next_state(rec.state, event, moves=rec.moves)
        except TransitionError as exc:
            log.warning("device %s job %s: %s", self.config.device_id, rec.job_id, exc)
            if rec.state in TERMINAL or event is Event.FAIL:
                return
            self.move(Event.FAIL, result=ResultCode.INTERNAL_ERROR, detail=str(exc)[:400])
            return
        log.info("device %s job %s: %s -[%s]-> %s", self.config.device_id, rec.job_id, rec.state, event, target)
        rec.state, rec.moves = target, rec.moves + 1
        if event is not Event.ROLLED_BACK:
            rec.result, rec.detail = int(result), detail[:480]
        if target in TERMINAL:
            rec.remember()
        self.store.save(rec)  # persisted before acting on it
        if target is not State.ROLLING_BACK:
            self.report()
        self.reactor.call_later(0, self._act)

    def report_state(self) -> JobState:
        return _JOB_STATE.get(self.record.state, JobState.ROLLED_BACK)

    def report(self, *, job_id: str | None = None, progress: float | None = None) -> None:
        rec = self.record
        state = self.report_state()
        done = rec.state in {State.ACTIVE, State.VALIDATING, State.INSTALLING, State.VERIFYING}
        current = self.slots.current()
        manifest = self.manifest()
        self.host.publish_event(
            JobEvent(
                job_id=job_id or rec.job_id or "none",
                state=state,
                progress=progress if progress is not None else (1.0 if done else 0.0),
                result=ResultCode(rec.result),
                detail=rec.detail,
                timestamp=self.wall(),
                model_version=current.version if current else None,
                artifact_sha256=manifest.sha256 if manifest else None,
            )
        )

    def manifest(self) -> Manifest | None:
        signed = self.signed()
        return signed.manifest if signed else None

    def signed(self) -> SignedManifest | None:
        """The job's signed manifest, parsed once per job (every step and event needs it)."""
        raw = self.record.manifest
        if raw is None:
            return None
        cached = self._signed
        if cached is not None and cached[0] is raw:
            return cached[1]
        try:
            signed = SignedManifest.model_validate(raw)
        except ValueError:
            return None
        self._signed = (raw, signed)
        return signed

    def _act(self) -> None:
        action = {
            State.DOWNLOADING: self._download,
            State.VERIFYING: self._verify,
            State.INSTALLING: self._install,
            State.VALIDATING: self._validate,
            State.ACTIVE: self._settle,
            State.ROLLING_BACK: self._roll_back,
        }.get(self.record.state, self._cleanup)
        try:
            action()
        except SimulatedCrashError:
            self.host.crash()
        except (AgentError, ProtocolError, OSError) as exc:  # a step that breaks fails its job, not the agent
            log.exception("device %s: %s failed", self.config.device_id, self.record.state)
            if isinstance(exc, ProtocolError):
                self._fail_job(exc.result_code, str(exc))
            else:
                self._fail_job(storage_code(exc, otherwise=ResultCode.INTERNAL_ERROR), str(exc))

    # -- start and commands ---------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Pick the stored job up again after a (re)start."""
        self.record = rec = self.store.load()
        was_clean, rec.clean_exit = rec.clean_exit, False
        if was_clean:  # a fresh device writes nothing until its first job
            self.store.save(rec)
        if rec.state in {State.DOWNLOADING, State.VERIFYING, State.INSTALLING, State.VALIDATING, State.ROLLING_BACK}:
            self.move(Event.RESUME)
        elif rec.state is State.ACTIVE and rec.probation_until is not None:
            if not was_clean:
                self.move(Event.FAIL, result=ResultCode.PROBATION_FAILED, detail="agent crashed during probation")
            else:
                self._settle()

    def mark_clean_exit(self) -> None:
        self.record.clean_exit = True
        self.store.save(self.record)

    def _verify_signed(self, signed: SignedManifest) -> Manifest:
        manifest = signed.manifest
        return verify_signed(
            signed,
            trusted_keys=self.config.trusted_keys,
            now=self.wall(),
            current_version=self.current_version(manifest.model_name),
            allow_rollback=self.record.rollback,
            profile=self.config.profile,
        )

    def current_version(self, model_name: str) -> int | None:
        current = self.slots.current()
        if current is None or current.meta.get("model_name") != model_name:
            return None
        return current.version

    def on_command(self, command: DeployCommand | RollbackCommand | ConfigureCommand) -> None:
        try:
            handle_command(self, command)
        except (AgentError, OSError) as exc:
            self.fail_on_storage(exc)

    def fail_on_storage(self, exc: AgentError | OSError) -> None:
        """The current job cannot go on because the device's storage failed (full, read-only, ...): it fails with
        `no_storage` (or `install_failed` for another cause) and the reason, its download stops, and nothing is
        raised, so the message loop goes on. Where even the job record cannot be written, the failure is still
        reported (the record is retried at the next start)."""
        if self.fetcher is not None:
            self.fetcher.cancel()
        rec = self.record
        code = storage_code(exc)
        log.error("device %s job %s: %s", self.config.device_id, rec.job_id, exc)
        if rec.job_id is None or rec.state in TERMINAL:
            return
        self._fail_job(code, str(exc))

    def _fail_job(self, code: ResultCode, detail: str) -> None:
        """Fail the current job; where even its record cannot be saved (a full disk), report the failure anyway
        and clean up (the record is retried at the next start). Raises nothing."""
        try:
            self.move(Event.FAIL, result=code, detail=detail[:400])
        except (AgentError, OSError) as again:
            log.warning(
                "device %s job %s: cannot record the failure (%s)", self.config.device_id, self.record.job_id, again
            )
            self.report()
            self.reactor.call_later(0, self._act)

    def start_job(self, job_id: str, manifest: SignedManifest, *, rollback: bool) -> None:
        """Make `manifest` the current job's (the caller then moves on DEPLOY or FAIL)."""
        rec = self.record
        rec.job_id, rec.manifest, rec.rollback = job_id, manifest.model_dump(mode="json", by_alias=True), rollback
        self._signed = (rec.manifest, manifest)
        rec.moves, rec.target_slot, rec.probation_until, rec.result, rec.detail = 0, None, None, 0, ""
        if self._probation_timer is not None:
            self._probation_timer.cancel()

    # -- the steps ------------------------------------------------------------------------------------------------
    def _download(self) -> None:
        signed = self.signed()
        if signed is None:
            self.move(Event.FAIL, result=ResultCode.INVALID_MESSAGE, detail="the job record lost its manifest")
            return
        try:
            manifest = self._verify_signed(signed)
        except VerificationError as exc:
            self.move(Event.FAIL, result=exc.result_code, detail=str(exc))
            return
        download = self._open_download(manifest)
        self.host.watch_artifact(manifest.sha256, on=True)
        cfg = self.config
        self.fetcher = Fetcher(
            download,
            self.reactor,
            send_request=self.host.send_block_request,
            on_complete=lambda: self.move(Event.DOWNLOADED),
            on_fail=lambda code, detail: self.move(Event.FAIL, result=code, detail=detail),
            on_progress=self._progress,
            input_pending=self.host.input_pending,
            timeout_s=cfg.request_timeout_s,
            timeout_max_s=cfg.request_timeout_max_s,
            max_attempts=cfg.max_request_attempts,
            max_bad_block=cfg.max_bad_block,
        )
        self.fetcher.start()

    def _open_download(self, manifest: Manifest) -> Download:
        return Download(
            self.config.data_dir / "download",
            artifact=manifest.sha256,
            size=manifest.size_bytes,
            block_size=manifest.block_size,
            block_hashes=manifest.block_sha256,
            durable=self.config.durable,
            flush_every=self.config.bitmap_flush_blocks,
            flush_interval_s=self.config.bitmap_flush_s,
        )

    def _progress(self, have: int, count: int) -> None:
        step = max(1, count // 4)
        if have % step == 0 and have < count:
            self.report(progress=have / count)

    def on_block(self, block: Block) -> None:
        if self.fetcher is not None and block.artifact_sha256 == self.fetcher.download.artifact:
            try:
                self.fetcher.on_block(block)
            except (AgentError, OSError) as exc:  # a block that cannot be written: no space, read-only storage
                self.fail_on_storage(exc)

    def on_connected(self) -> None:
        if self.fetcher is not None and not self.fetcher.done:
            self.fetcher.reconnected()

    def _verify(self) -> None:
        signed = self.signed()
        if signed is None:
            self.move(Event.FAIL, result=ResultCode.INVALID_MESSAGE, detail="the job record lost its manifest")
            return
        manifest = signed.manifest
        download = self._open_download(manifest)
        try:
            self._verify_signed(signed)
            verify_download(manifest, download)
        except VerificationError as exc:
            download.discard()
            self.move(Event.FAIL, result=exc.result_code, detail=str(exc))
            return
        self.move(Event.VERIFIED)

    def _install(self) -> None:
        manifest = self.manifest()
        if manifest is None:
            self.move(Event.FAIL, result=ResultCode.INVALID_MESSAGE, detail="the job record lost its manifest")
            return
        rec = self.record
        rec.target_slot = self.slots.inactive_name()
        self.store.save(rec)
        crash, self._crash_armed = self._crash_armed, False
        try:
            install_into_slot(self.slots, self._open_download(manifest), manifest, crash=crash)
        except SlotError as exc:
            self.move(Event.FAIL, result=storage_code(exc), detail=str(exc))
            return
        self.move(Event.INSTALLED)

    def _validate(self) -> None:
        manifest, rec = self.manifest(), self.record
        info = self.slots.info(rec.target_slot) if rec.target_slot else None
        if manifest is None or info is None or info.digest != manifest.sha256:
            self.move(Event.FAIL, result=ResultCode.INSTALL_FAILED, detail="the installed slot is not the artifact")
            return
        budget = manifest.latency_budget_ms or self.config.profile.latency_budget_ms
        runner = self.host.load_runner(info.model_path, info.digest)
        outcome = validate_model(runner, manifest, latency_budget_ms=budget)
        if not outcome.ok:
            self.move(Event.FAIL, result=ResultCode.VALIDATION_FAILED, detail=outcome.detail)
            return
        self.slots.activate(info.name)
        rec.probation_until = self.wall().timestamp() + self.probation_s
        self._probation = self._new_probation()
        self.host.model_changed(runner)  # the validated, warm session serves from now on: no second load
        self.move(Event.VALIDATED, detail=outcome.detail)

    def _settle(self) -> None:
        """Active: clean the download up and watch the probation window, if one is running."""
        self._cleanup()
        until = self.record.probation_until
        if until is None:
            return
        if self._probation is None:
            self._probation = self._new_probation()
        if self._probation_timer is not None:
            self._probation_timer.cancel()
        self._probation_timer = self.reactor.call_later(max(0.0, until - self.wall().timestamp()), self._end_probation)

    def _new_probation(self) -> Probation:
        budget_ms = self.config.profile.latency_budget_ms
        return Probation(max_errors=self.config.probation_max_errors, budget_s=budget_ms / 1000.0)

    def _end_probation(self) -> None:
        self._probation_timer = None
        if self.record.state is State.ACTIVE and self.record.probation_until is not None:
            self.record.probation_until, self._probation = None, None
            self.move(Event.PROBATION_PASSED, detail="probation passed")

    def on_inference(self, *, latency_s: float, error: bool) -> None:
        """Probation watch: an error burst or a p95 over the budget rolls the new model back."""
        if self.record.state is not State.ACTIVE or self.record.probation_until is None or self._probation is None:
            return
        reason = self._probation.observe(latency_s=latency_s, error=error)
        if reason is not None:
            if self._probation_timer is not None:
                self._probation_timer.cancel()
            self.move(Event.FAIL, result=ResultCode.PROBATION_FAILED, detail=reason)

    def _roll_back(self) -> None:
        """Go back to the previous slot (or drop a prepared one); never fails outward."""
        rec = self.record
        try:
            current = self.slots.current_name()
            if rec.target_slot is not None and current == rec.target_slot:
                other = "b" if current == "a" else "a"
                if self.slots.info(other) is not None:
                    self.slots.activate(other)
                self.host.model_changed()
            elif rec.target_slot is not None:
                self.slots.clear(rec.target_slot)
        except (AgentError, OSError):
            log.exception("device %s: rollback step failed; keeping the model that is running", self.config.device_id)
        rec.probation_until = None
        self.move(Event.ROLLED_BACK)

    def _cleanup(self) -> None:
        if self.fetcher is not None:
            self.fetcher.cancel()
            self.host.watch_artifact(self.fetcher.download.artifact, on=False)
            if self.record.state is not State.FAILED or self.fetcher.download.complete:
                self.fetcher.download.discard()
            self.fetcher = None
        elif self.record.state in {State.ACTIVE, State.ROLLED_BACK} and (manifest := self.manifest()) is not None:
            self._open_download(manifest).discard()
