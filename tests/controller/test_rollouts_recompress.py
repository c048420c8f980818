"""The closed loop: slow devices trigger one (debounced) recompression, approved or automatic, rolled out, done.

The compression worker is a stand-in (`builder`) that signs an artifact measured to fit; the planner itself is
tested in tests/planner. Commands go to a recording publisher: the broker side of the engine is covered by
test_rollouts.py.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from sqlmodel import select

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import AuditEntry, Device, Rollout, TelemetryRollup
from edgefleet.controller.errors import ConflictError, NotFoundError
from edgefleet.controller.recompress.loop import RESTART_NOTE, BuildRequest, BuildResult, RecompressionLoop
from edgefleet.controller.recompress.policy import RecompressionPolicy
from edgefleet.controller.rollout.api import Rollouts, class_current_version
from edgefleet.controller.rollout.engine import RolloutEngine
from edgefleet.controller.rollout.metrics import RolloutCollector
from edgefleet.controller.rollout.plan import GateConfig, WavePlan
from edgefleet.controller.service.state_updates import apply_job_event
from edgefleet.protocols.codec import decode_command
from edgefleet.protocols.commands import DeployCommand
from edgefleet.protocols.messages import JobEvent
from edgefleet.protocols.profile import load_profile
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, bucket_index
from edgefleet.protocols.topics import parse_topic

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
POLICY = RecompressionPolicy(latency_windows=3, min_samples=20, speed_factor_tolerance=None, cooldown_s=600)
DEVICES = [f"pi-{i}" for i in range(5)]
BUDGET_MS = load_profile(PROFILES / "rpi4.toml").latency_budget_ms  # 2 ms
SLOW = 0.0025  # seconds: in the 3 ms bucket (1.5x the budget)


class Recorder:
    """A publisher that keeps what the engine sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, DeployCommand]] = []

    def publish(self, topic: str, payload: bytes, **_: object) -> None:
        command = decode_command(payload)
        assert isinstance(command, DeployCommand)
        device = parse_topic(topic).device
        assert device is not None
        self.sent.append((device, command))


class Loop:
    def __init__(self, db: Database, tmp: Path, onnx: Path) -> None:
        self.db = db
        self.now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
        registry = Registry(db)
        registry.create_fleet("default")
        registry.add_class(load_profile(PROFILES / "rpi4.toml"))
        registry.register_devices(DEVICES, class_name="rpi4", fleet="default")
        registry.add_model("tiny", source="test", task="classification")
        self.catalog = ArtifactCatalog(db, store=ArtifactStore(tmp / "s"), signing_key=Ed25519PrivateKey.generate())
        self.onnx = onnx
        self.catalog.add_from_onnx("tiny", class_name="rpi4", onnx_path=onnx, metrics={"predicted_p95_ms": 1.0})
        with db.transaction() as session:
            for device in session.exec(select(Device)).all():
                device.online, device.model_version = True, 1
                session.add(device)
        self.builds: list[BuildRequest] = []
        gates = GateConfig(min_devices=1, min_samples=20, min_labelled=20, window_s=600)
        self.loop = RecompressionLoop(
            db, builder=self.build, plan=WavePlan(canary="1", growth=4), gates=gates, clock=lambda: self.now
        )
        self.recorder = Recorder()
        self.engine = RolloutEngine(db, publisher=self.recorder)

    def build(self, request: BuildRequest) -> BuildResult:
        """The worker's stand-in: a new artifact predicted at 1 ms on the device (the budget is 2 ms)."""
        self.builds.append(request)
        metrics = {"predicted_p95_ms": 1.0, "accuracy": 0.9}
        artifact = self.catalog.add_from_onnx(
            "tiny", class_name=request.class_name, onnx_path=self.onnx, metrics=metrics
        )
        correction = request.profile.speed_correction
        return BuildResult(artifact.id or 0, {"binding": "latency", "speed_correction": correction})

    def windows(self, n: int, *, latency: float, version: int = 1) -> None:
        """`n` one-minute telemetry windows ending now, every device at `latency`."""
        counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
        counts[bucket_index(latency)] = 30
        with self.db.transaction() as session:
            for k in range(n):
                start = self.now - dt.timedelta(minutes=n - k)
                for device in DEVICES:
                    session.add(
                        TelemetryRollup(
                            device_id=device, class_name="rpi4", model_version=version, window_start=start,
                            window_seconds=60, inferences=30, labelled=30, correct=28,
                            latency_counts_json=json.dumps(counts),
                        )
                    )  # fmt: skip

    def run_rollout(self, rollout_id: int) -> None:
        """Play the devices: every deploy command is answered `active`, then fast telemetry on the new version."""
        for _ in range(10):
            self.now += dt.timedelta(seconds=5)
            self.engine.tick(self.now)
            for device, command in self.recorder.sent:
                event = JobEvent(job_id=command.job_id, state="active", timestamp=self.now, model_version=2)  # type: ignore[arg-type]
                apply_job_event(self.db, device, event, now=self.now)
            self.recorder.sent.clear()
            self.windows(1, latency=0.001, version=2)
            if Rollouts(self.db).get(rollout_id).state == "completed":
                return


@pytest.fixture
def setup(tmp_path: Path, tiny_onnx: Path) -> Iterator[Loop]:
    db = Database.open(f"sqlite:///{tmp_path / 'r.db'}", timeout=2)
    db.migrate()
    yield Loop(db, tmp_path, tiny_onnx)
    db.dispose()


def test_slow_devices_trigger_one_recompression_that_is_approved_and_rolled_out(setup: Loop) -> None:
    s = setup
    s.loop.set_policy("rpi4", POLICY)
    s.windows(2, latency=SLOW)
    assert s.loop.step(s.now) == []  # two slow windows: not yet K = 3
    s.now += dt.timedelta(minutes=3)
    s.windows(3, latency=SLOW)
    (rid,) = s.loop.step(s.now)
    row = s.loop.get(rid)
    assert (row.trigger, row.state) == ("latency", "pending")
    assert "over the 2 ms budget for 3 windows" in row.summary
    assert len(s.builds) == 1
    assert s.builds[0].profile.speed_correction == 3.0  # field p95 3 ms (its bucket bound) / predicted 1 ms
    registry = CollectorRegistry()
    registry.register(RolloutCollector(s.db))
    assert registry.get_sample_value("edgefleet_recompression_pending", {"device_class": "rpi4", "model": "tiny"}) == 1
    for _ in range(3):  # the problem persists: still one recompression
        s.now += dt.timedelta(minutes=1)
        s.windows(1, latency=SLOW)
        assert s.loop.step(s.now) == []
    assert len(s.builds) == 1
    approved = s.loop.approve(rid)
    assert approved.state == "rolling_out"
    assert approved.rollout_id is not None
    s.run_rollout(approved.rollout_id)
    s.loop.step(s.now)
    assert s.loop.get(rid).state == "done"
    with s.db.reading() as session:
        assert class_current_version(session, "rpi4") == 2
        actions = [a.action for a in session.exec(select(AuditEntry)).all()]
    assert {"recompress.trigger", "class.profile.update", "recompress.built", "recompress.approve"} <= set(actions)
    s.now += dt.timedelta(minutes=1)
    assert s.loop.step(s.now) == []  # the class is on the new model (and cooling down): nothing more to do


def test_auto_policy_rolls_out_without_asking_and_reject_and_missing_worker(setup: Loop) -> None:
    s = setup
    s.loop.set_policy("rpi4", POLICY.model_copy(update={"mode": "auto"}))
    s.windows(3, latency=SLOW)
    (rid,) = s.loop.step(s.now)
    row = s.loop.get(rid)
    assert row.state == "rolling_out"
    assert Rollouts(s.db).get(row.rollout_id or 0).state == "pending"
    with pytest.raises(ConflictError, match="only a pending one"):
        s.loop.approve(rid)
    with pytest.raises(ConflictError, match="can no longer be rejected"):
        s.loop.reject(rid, reason="too late")
    with pytest.raises(NotFoundError):
        s.loop.reject(99, reason="x")


def test_without_a_worker_the_recompression_fails_clearly_then_cools_down(setup: Loop) -> None:
    s = setup
    s.loop.builder = None
    s.loop.set_policy("rpi4", POLICY)
    s.windows(3, latency=SLOW)
    (rid,) = s.loop.step(s.now)
    row = s.loop.get(rid)
    assert (row.state, row.note) == ("failed", "no compression worker is attached")
    s.now += dt.timedelta(minutes=5)
    assert s.loop.step(s.now) == []  # cooldown: one problem, one recompression
    s.now += dt.timedelta(minutes=10)
    s.windows(3, latency=SLOW)
    assert len(s.loop.step(s.now)) == 1


def test_recompress_cli(ready, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nmode = 'sometimes'\n")
    result = ready("recompress", "policy", "rpi4", "--file", str(bad))
    assert result.exit_code == 1
    assert "mode" in result.output
    assert "Traceback" not in result.output
    assert ready("recompress", "policy", "rpi4", "--file", str(tmp_path / "missing.toml")).exit_code == 1
    good = tmp_path / "good.toml"
    good.write_text("[policy]\nlatency_windows = 2\nmode = 'auto'\n")
    assert ready.json("recompress", "policy", "rpi4", "--file", str(good))["policy"]["latency_windows"] == 2
    assert ready.json("recompress", "list") == []
    for verb in ("approve", "show"):
        result = ready("recompress", verb, "7")
        assert result.exit_code == 1
        assert "recompression 7 does not exist" in result.output
    assert ready("recompress", "reject", "nope").exit_code == 2


@pytest.mark.slow
def test_the_planner_worker_builds_an_artifact_that_meets_the_updated_budget(setup: Loop, tmp_path: Path) -> None:
    """The real worker: a tiny digits MLP re-planned for the field's speed factor, signed as version 2."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from edgefleet.compression import Task
    from edgefleet.compression.planner import PlanOptions
    from edgefleet.compression.training import fit
    from edgefleet.controller.recompress.worker import PlannerBuilder

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digits = load_digits()
        x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
        task = Task.from_arrays("digits", x_train=x[:1000], y_train=y[:1000], x_val=x[1000:1400], y_val=y[1000:1400])
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        fit(model, task, epochs=10, time_budget_s=20, lr=3e-3)
        model.eval()
        s = setup
        fast = PlanOptions(rung_epochs=(1,), latency_runs=20, latency_repeats=1, rss=False, max_chains=2, eta=2)
        s.loop.builder = PlannerBuilder(
            s.catalog, load_model=lambda _: (model, task), workdir=tmp_path / "w", options=fast
        )
        s.loop.set_policy("rpi4", POLICY.model_copy(update={"mode": "auto"}))
        s.windows(3, latency=SLOW)
        (rid,) = s.loop.step(s.now)
    finally:
        torch.set_num_threads(threads)
    row = s.loop.get(rid)
    assert row.state == "rolling_out", row.note
    report = json.loads(row.report_json)
    assert report["speed_correction"] == 3.0
    assert report["predicted_p95_ms"] <= BUDGET_MS  # the class budget, at the speed the field showed
    assert report["version"] == 2


# ---------------------------------------------------------------- review: approval races, auto errors, restarts
@pytest.fixture
def any_db(database: Database, tmp_path: Path, tiny_onnx: Path) -> Loop:
    """The same loop on SQLite and (where one answers) PostgreSQL."""
    return Loop(database, tmp_path, tiny_onnx)


def pending(s: Loop) -> int:
    """One recompression built and waiting for approval."""
    s.loop.set_policy("rpi4", POLICY)
    s.windows(3, latency=SLOW)
    (rid,) = s.loop.step(s.now)
    assert s.loop.get(rid).state == "pending"
    return rid


def rollout_count(db: Database) -> int:
    with db.reading() as session:
        return len(session.exec(select(Rollout)).all())


def test_two_threads_approving_one_recompression_start_one_rollout(any_db: Loop) -> None:
    s = any_db
    rid = pending(s)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def approve() -> None:
        barrier.wait()
        try:
            s.loop.approve(rid)
            outcomes.append("approved")
        except ConflictError as exc:
            outcomes.append(str(exc))

    def start() -> None:  # an operator starting the same artifact at the same moment
        barrier.wait()
        try:
            Rollouts(s.db).start(s.loop.get(rid).artifact_id or 0)
            outcomes.append("started")
        except ConflictError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=f) for f in (approve, approve, start, start)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 4, outcomes
    assert outcomes.count("approved") + outcomes.count("started") == 1, outcomes
    assert rollout_count(s.db) == 1
    row = s.loop.get(rid)
    if "approved" in outcomes:
        assert row.state == "rolling_out"
        assert row.rollout_id is not None
    else:  # the operator won: the recompression is still pending (auto mode retries after that rollout)
        assert (row.state, row.rollout_id) == ("pending", None)


def test_approve_after_reject_is_refused_and_the_row_stays_rejected(any_db: Loop) -> None:
    s = any_db
    rid = pending(s)
    s.loop.reject(rid, reason="not now")
    with pytest.raises(ConflictError, match="is rejected; only a pending one"):
        s.loop.approve(rid)
    assert s.loop.get(rid).state == "rejected"
    assert rollout_count(s.db) == 0
    with pytest.raises(NotFoundError, match="recompression 99 does not exist"):
        s.loop.approve(99)


def test_a_failed_rollout_start_leaves_the_recompression_pending(setup: Loop) -> None:
    s = setup
    rid = pending(s)
    move_devices(s.db, "x86-gateway")
    with pytest.raises(NotFoundError, match="no devices in class rpi4"):
        s.loop.approve(rid)
    row = s.loop.get(rid)
    assert (row.state, row.rollout_id, row.decided_by) == ("pending", None, None)  # rolled back as a whole


def move_devices(db: Database, class_name: str) -> None:
    registry = Registry(db)
    if class_name not in {c.name for c, _ in registry.list_classes()}:
        registry.add_class(load_profile(PROFILES / f"{class_name}.toml"))
    with db.transaction() as session:
        for device in session.exec(select(Device)).all():
            device.class_name = class_name
            session.add(device)


def test_auto_approve_fails_the_row_on_a_permanent_error(setup: Loop) -> None:
    s = setup
    build = s.build

    def build_then_empty_the_class(request: BuildRequest) -> BuildResult:
        result = build(request)
        move_devices(s.db, "x86-gateway")  # no device of the class is left to roll out to
        return result

    s.loop.builder = build_then_empty_the_class
    s.loop.set_policy("rpi4", POLICY.model_copy(update={"mode": "auto"}))
    s.windows(3, latency=SLOW)
    (rid,) = s.loop.step(s.now)
    row = s.loop.get(rid)
    assert row.state == "failed"
    assert "rollout not started: no devices in class rpi4" in (row.note or "")
    assert row.finished_at is not None
    s.now += dt.timedelta(minutes=1)
    s.loop.step(s.now)
    assert s.loop.get(rid).state == "failed"  # not retried
    assert rollout_count(s.db) == 0


def test_auto_approve_retries_while_a_rollout_to_the_class_is_live(setup: Loop) -> None:
    s = setup
    build = s.build
    operator: list[int] = []

    def build_while_an_operator_rolls_out(request: BuildRequest) -> BuildResult:
        operator.append(Rollouts(s.db).start(request.from_artifact_id).id or 0)
        return build(request)

    s.loop.builder = build_while_an_operator_rolls_out
    s.loop.set_policy("rpi4", POLICY.model_copy(update={"mode": "auto"}))
    s.windows(3, latency=SLOW)
    (rid,) = s.loop.step(s.now)
    assert s.loop.get(rid).state == "pending"  # a ConflictError: retried, not failed
    s.loop.step(s.now)
    assert s.loop.get(rid).state == "pending"
    Rollouts(s.db).abort(operator[0])
    s.loop.step(s.now)
    row = s.loop.get(rid)
    assert row.state == "rolling_out"
    assert row.rollout_id not in (None, operator[0])


def test_a_build_that_never_began_survives_two_restarts_and_is_built(setup: Loop) -> None:
    s = setup
    s.loop.submit = lambda request: False  # the build thread is busy with another class: nothing begins
    s.loop.set_policy("rpi4", POLICY)
    s.windows(3, latency=SLOW)
    (rid,) = s.loop.step(s.now)
    assert s.loop.get(rid).state == "building"
    for _ in range(2):  # two controller restarts
        assert s.loop.recover(s.now) == []
        row = s.loop.get(rid)
        assert (row.state, row.note) == ("building", None)
    s.loop.submit = None
    s.loop.step(s.now)
    row = s.loop.get(rid)
    assert (row.state, row.note) == ("pending", None)
    assert len(s.builds) == 1


def test_a_build_that_began_is_retried_once_then_failed(setup: Loop) -> None:
    s = setup
    s.loop.submit = lambda request: False
    s.loop.set_policy("rpi4", POLICY)
    s.windows(3, latency=SLOW)
    (rid,) = s.loop.step(s.now)
    assert s.loop.begin_build(rid, s.now)  # the worker began it; then the controller stopped
    assert s.loop.recover(s.now) == [rid]
    assert (s.loop.get(rid).note or "").startswith(RESTART_NOTE)
    assert s.loop.recover(s.now) == []  # restarted again before the retry began: still waiting, not failed
    assert s.loop.get(rid).state == "building"
    assert s.loop.begin_build(rid, s.now)  # the retry began; the controller stopped again
    assert s.loop.recover(s.now) == []
    row = s.loop.get(rid)
    assert row.state == "failed"
    assert "stopped twice" in (row.note or "")
    assert not s.loop.begin_build(rid, s.now)
