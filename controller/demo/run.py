"""`edgefleet demo`: the whole product on one machine, end to end, in a few minutes.

The story, from a fresh clone:

1. A temporary edgefleet home; a Mosquitto of its own on a free port, secured as `edgefleet broker config` secures
   one (per-device passwords and ACLs, anonymous clients refused); the controller (`ControllerApp`: MQTT service,
   block server, rollout engine, recompression loop, metrics endpoint) in this process; one `edgefleet-agent
   simulate --credentials` process per device class (three classes of ten devices by default).
2. The digits example trained once and compressed per class, with a progress bar per class. The class chosen to
   run slow later (`slow_class`) gets the accurate full-width student: it fits its budget at the profiled speed.
3. Each model signed with validation samples and rolled out in waves (a canary of two devices, then doubling),
   gated on accuracy, p95 latency, errors and deploy failures; the rollouts' live status view meanwhile.
4. Two planted problems, at once:
   - once their probation is over, the slow class's devices restart 2-3x slower than their profile says (a
     firmware that throttles the CPU; `slow_factor`, 2.5 by default);
     the controller's recompression loop sees p95 over budget for consecutive telemetry windows, triggers, the
     demo's compression worker (`LadderBuilder`) picks the most accurate model predicted to fit at the speed the
     field shows, and the loop rolls it out (gated) until the class is back within budget;
   - a second artifact for another class (`bad_class`) whose labels are swapped (its accuracy collapses, yet it
     agrees with its own validation samples, so the devices accept it): the canary's accuracy gate stops it and
     the rollout is aborted, the canary devices rolled back.
5. `duration_s` seconds of the fleet running as it now is, then a summary table per class (every artifact the
   registry holds for it, each rollout's outcome and breach), its story, and a verdict per class computed from the
   numbers shown (and `--json`); a table that disagrees with its story is a problem (exit 1).

Everything it started is stopped by PID at the end, on Ctrl-C or SIGTERM. With `--mqtt-port` it uses that broker
instead, as its owner configured it (the devices connect to it anonymously).

Example::

    summary = Demo(DemoOptions(duration_s=10, devices=3), console=Console()).run()
    summary.ok, summary.classes[0].versions
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.spinner import Spinner
from sqlmodel import col, select

from edgefleet.controller.artifacts.keys import public_key_path
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.artifacts.validation_set import ValidationSet
from edgefleet.controller.broker.config import controller_secret
from edgefleet.controller.broker.mosquitto import free_port
from edgefleet.controller.cli.rollout import render as render_rollout
from edgefleet.controller.config import Settings
from edgefleet.controller.data.home import init_home
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.data.tables import Artifact, DeploymentJob, Device, RolloutDevice, utcnow
from edgefleet.controller.demo.builder import LadderBuilder
from edgefleet.controller.demo.credentials import credentials_path
from edgefleet.controller.demo.fleet import FleetSpec, SimulatedFleet
from edgefleet.controller.demo.models import (
    LADDER,
    SWAPPED_LABELS,
    BuiltModel,
    CompressMode,
    TrainedModel,
    compress_for_class,
    host_times,
    onnx_accuracy,
    swap_labels,
    train_digits,
    validation_arrays,
    write_validation_set,
)
from edgefleet.controller.demo.report import (
    ClassStory,
    OverviewRow,
    StoryEvent,
    VersionStory,
    Waiting,
    breach_sentence,
    budget_verdict,
    closing_verdict,
    disagreements,
    render_overview,
    wait_with_bars,
)
from edgefleet.controller.demo.setup import (
    BrokerChoice,
    Signed,
    check_configured_broker,
    demo_settings,
    prepare_registry,
    sign_artifact,
    simulation_profile,
    start_managed_broker,
)
from edgefleet.controller.demo.story import (
    ACCURACY_MARGIN,
    RolloutOutcome,
    class_artifacts,
    demo_policy,
    recent,
    recompressions,
    rollout_gates,
    rollout_outcome,
    rollout_plan,
)
from edgefleet.controller.errors import ConfigError, ControllerError
from edgefleet.controller.rollout.api import Rollouts
from edgefleet.controller.rollout.status import describe
from edgefleet.controller.service.app import ControllerApp
from edgefleet.protocols.profile import DeviceProfile

__all__ = ["ALLOWED_FAILURES", "Demo", "DemoOptions", "DemoSummary"]

log = logging.getLogger(__name__)

MODEL = "digits"
_REFUSED = ("failed", "timed_out", "rolled_back")
RECENT_S = 12.0  # the live view's and the summary's "last seconds": three rollup windows, a p95 of 100+ samples
VALIDATION_SAMPLES = 16
PROBATION_S = 30.0  # the agent's probation after a model switch (AgentConfig.probation_s)
STAGGER_S = 3.0  # between the first rollouts' starts
RECOVERED_SAMPLES = 60  # inferences of the new version before "recovered" is told (a p95 of fewer is noise)
ALLOWED_FAILURES = 0.8  # share of a class's devices that must end on its current model (rollout_gates: 0.2 may fail)


def default_profiles_dir() -> Path:
    """deploy/profiles of this checkout (the package is installed from the repository), else of the cwd."""
    here = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
    return here if here.is_dir() else Path("deploy/profiles")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    duration_s: float = 20.0  # the fleet running as it ends up, after the story
    devices: int = 10
    classes: tuple[str, ...] = ("x86-gateway", "rpi4", "cortex-a53")
    slow_class: str | None = "rpi4"  # its devices restart slow_factor times slower; None: no planted slowdown
    slow_factor: float = 2.5
    bad_class: str | None = "x86-gateway"  # gets a second artifact with swapped labels; None: not planted
    home: Path | None = None
    keep_home: bool = False
    broker: tuple[str, int] | None = None  # a broker to use instead of a managed one
    compress: CompressMode = CompressMode.recipe
    plan_budget_s: float = 30.0
    train_epochs: int = 4
    telemetry_window_s: float = 2.0
    rate_hz: float = 3.0
    online_timeout_s: float = 60.0
    rollout_timeout_s: float = 120.0
    story_timeout_s: float = 180.0
    fleet: str = "demo"
    profiles_dir: Path = dataclasses.field(default_factory=default_profiles_dir)

    def check(self) -> None:
        """Refuse contradictory options before anything starts."""
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"a class is named twice in {', '.join(self.classes)}")
        for what, name in (("--slow-class", self.slow_class), ("--bad-class", self.bad_class)):
            if name is not None and name not in self.classes:
                raise ConfigError(f"{what} {name} is not one of the demo's classes ({', '.join(self.classes)})")
        if self.slow_class is not None and self.slow_class == self.bad_class:
            raise ConfigError(f"--slow-class and --bad-class are both {self.slow_class}: plant them in two classes")
        if not 1.5 <= self.slow_factor <= 10:
            raise ConfigError(f"--slow-factor {self.slow_factor:g}: between 1.5 and 10")


@dataclasses.dataclass(slots=True)
class DemoSummary:
    ok: bool
    home: str
    broker: str
    broker_auth: str
    metrics_url: str
    seconds: dict[str, float]
    classes: list[ClassStory]
    problems: list[str]
    stopped: dict[str, Any] = dataclasses.field(default_factory=dict)
    builds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    verdict: list[str] = dataclasses.field(default_factory=list)  # one line per class, then the sum of them

    def as_dict(self) -> dict[str, Any]:
        value = dataclasses.asdict(self)
        value["classes"] = [c.as_dict() for c in self.classes]
        return value


@dataclasses.dataclass(slots=True)
class _Watch:
    """One planted problem being followed in the live view."""

    class_name: str
    kind: str  # "slow" or "bad"
    done: bool = False
    rollout_id: int | None = None
    version: int | None = None  # the version that rollout rolls out
    seen: set[str] = dataclasses.field(default_factory=set)
    plant_at: float = 0.0  # monotonic time when the slowdown is planted
    planted: bool = False


class Demo:
    """One run of the demo; `run()` returns the summary and has stopped everything by then."""

    def __init__(self, options: DemoOptions, *, console: Console) -> None:
        options.check()
        self.options = options
        self.console = console
        self.seconds: dict[str, float] = {}
        self.problems: list[str] = []
        self.fleets: dict[str, SimulatedFleet] = {}
        self.stopped: dict[str, Any] = {}
        self.app: ControllerApp | None = None
        self.builder: LadderBuilder | None = None
        self.home = options.home
        self.broker = BrokerChoice(host="127.0.0.1", port=0, auth="not started", managed=None)
        self.profiles: dict[str, DeviceProfile] = {}
        self.stories: dict[str, ClassStory] = {}
        self.trained: TrainedModel | None = None
        self.validation: ValidationSet | None = None
        self.floor: dict[str, float] = {}
        self._began = time.monotonic()
        self._began_utc = utcnow()  # registry times (an artifact's created_at) are placed in the story with it
        self._first_done = time.monotonic()

    # ------------------------------------------------------------------ the whole run
    def run(self) -> DemoSummary:
        self._began, self._began_utc = time.monotonic(), utcnow()
        finished = False
        try:
            with self._teardown():
                self._setup()
                self.trained = self._step("train", "training the digits example", self._train)
                built = self._compress(self.trained)
                self._first_rollouts(built)
                self._plant_and_follow()
                self._observe()
                self._final_numbers()
                finished = True
        finally:
            self.seconds["total"] = round(time.monotonic() - self._began, 1)
            self._remove_home(keep=not finished or not self._all_good())
        return self._summary()

    def _summary(self) -> DemoSummary:
        app = self.app
        metrics = f"http://{app.settings.metrics_host}:{app.settings.metrics_port}/metrics" if app else ""
        ok, verdict = closing_verdict(list(self.stories.values()), self.problems, share=ALLOWED_FAILURES)
        return DemoSummary(
            ok=ok,
            home=str(self.home),
            broker=f"{self.broker.host}:{self.broker.port}",
            broker_auth=self.broker.auth,
            metrics_url=metrics,
            seconds=self.seconds,
            classes=list(self.stories.values()),
            problems=self.problems,
            stopped=self.stopped,
            builds=list(self.builder.builds) if self.builder is not None else [],
            verdict=verdict,
        )

    def _all_good(self) -> bool:
        """No problem, and every class within its budget on a model that runs on its devices (a rollout's
        failure gate lets up to a fifth of them refuse it: a device whose validation failed keeps what it had)."""
        return closing_verdict(list(self.stories.values()), self.problems, share=ALLOWED_FAILURES)[0]

    def _step(self, name: str, text: str, func: Callable[[], Any]) -> Any:
        began = time.monotonic()
        with self.console.status(f"{text}..."):
            result = func()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - began, 1)
        self.console.print(f"[green]✓[/] {text} ({time.monotonic() - began:.1f}s)")
        return result

    def _event(
        self,
        class_name: str,
        text: str,
        *,
        version: int | None = None,
        rollout: RolloutOutcome | None = None,
        at: float | None = None,
    ) -> None:
        """A line of the class's story, with the version and rollout it names (a final state with it) so that
        `disagreements` can hold the summary's table to it."""
        at = time.monotonic() - self._began if at is None else at
        event = StoryEvent(
            at_s=at,
            text=text,
            version=version,
            rollout_id=rollout.rollout_id if rollout is not None else None,
            rollout_state=rollout.state if rollout is not None and rollout.final else None,
        )
        self.stories[class_name].events.append(event)
        self.console.print(f"[bold]{at:5.0f}s[/] {class_name}: {escape(text)}")

    @property
    def _app(self) -> ControllerApp:
        assert self.app is not None  # noqa: S101 - started by _setup
        return self.app

    @property
    def _home(self) -> Path:
        assert self.home is not None  # noqa: S101 - set by _setup
        return self.home

    # ------------------------------------------------------------------ setting up
    def _setup(self) -> None:
        began = time.monotonic()
        if self.home is None:
            self.home = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
        self.console.print(f"edgefleet home [bold]{self.home}[/]")
        settings = self._start_broker_and_controller(self.home)
        x, _ = validation_arrays()
        self.validation = ValidationSet.from_arrays(x[:VALIDATION_SAMPLES])
        if self.builder is not None:
            self.builder.validation = self.validation
        dataset = write_validation_set(self.home / "digits-val.npz")
        for name in self.profiles:
            self._start_fleet(name, dataset, settings)
        self.seconds["setup"] = round(time.monotonic() - began, 1)
        self._wait_online()

    def _start_broker_and_controller(self, home: Path) -> Settings:
        """Registry rows and device passwords first: the managed broker's password file is written from them."""
        options = self.options
        configured = check_configured_broker(*options.broker) if options.broker is not None else None
        host, port = (configured.host, configured.port) if configured is not None else ("127.0.0.1", free_port())
        settings = demo_settings(home, mqtt_host=host, mqtt_port=port, fleet=options.fleet)
        init_home(settings)
        if configured is None:
            controller_secret(settings)  # before the app is built: it reads its MQTT login from there
        app = self.app = ControllerApp(
            settings, registry=CollectorRegistry(), recompress=True, recompress_interval_s=2.0
        )
        self.builder = LadderBuilder(
            app, trained=lambda: self.trained, validation=None, model_name=MODEL, build_dir=home / "build"
        )
        if app.recompression is not None:
            app.recompression.builder = self.builder
        self.profiles = prepare_registry(
            app.db,
            fleet=options.fleet,
            classes=options.classes,
            devices=options.devices,
            profiles_dir=options.profiles_dir,
            model=MODEL,
            home=home,
            mqtt_host=host,
            mqtt_port=port,
        )
        for name, profile in self.profiles.items():
            self.stories[name] = ClassStory(name, profile.latency_budget_ms, self._device_over_host(profile))
        self.broker = configured or start_managed_broker(settings, Registry(app.db, actor="demo"))
        where = "managed mosquitto" if self.broker.managed else "configured broker"
        pid = f", pid {self.broker.managed.pid}" if self.broker.managed else ""
        self.console.print(f"[green]✓[/] {where} on {host}:{port}{pid} ({self.broker.auth})")
        app.start()
        self.console.print(
            f"[green]✓[/] controller up; metrics on http://{settings.metrics_host}:{settings.metrics_port}/metrics"
        )
        return settings

    def _fleet_spec(self, name: str, dataset: Path, settings: Settings, *, slow: float | None = None) -> FleetSpec:
        options = self.options
        return FleetSpec(
            class_name=name,
            profile_path=simulation_profile(options.profiles_dir / f"{name}.toml", self._home / "profiles"),
            devices=options.devices,
            host=self.broker.host,
            port=self.broker.port,
            fleet=options.fleet,
            trusted_key=public_key_path(settings.key_path),
            dataset=dataset,
            data_dir=self._home / "devices" / name,
            log_path=self._home / "logs" / f"simulate-{name}.log",
            telemetry_window_s=options.telemetry_window_s,
            rate_hz=options.rate_hz,
            # a configured broker is the user's: devices connect to it anonymously, as they always have
            credentials=credentials_path(self._home, name) if self.broker.managed else None,
            slow_devices=options.devices if slow is not None else 0,
            slow_factor=slow if slow is not None else 1.0,
        )

    def _start_fleet(self, name: str, dataset: Path, settings: Settings, *, slow: float | None = None) -> None:
        spec = self._fleet_spec(name, dataset, settings, slow=slow)
        fleet = self.fleets[name] = SimulatedFleet.start(spec)
        how = f", {spec.slow_factor:g}x slower than profiled" if slow is not None else ""
        self.console.print(f"[green]✓[/] simulated {name} fleet: {spec.devices} devices, pid {fleet.pid}{how}")

    def _check_fleets(self) -> None:
        for fleet in self.fleets.values():
            fleet.check()

    def _wait(self, name: str, title: str, timeout: float, poll: Callable[[], dict[str, Waiting]]) -> None:
        """Bars until every class is done; a timeout is counted as a problem, and the demo goes on."""
        began = time.monotonic()
        classes = tuple(self.profiles)
        if not wait_with_bars(self.console, title, poll, classes=classes, timeout=timeout, check=self._check_fleets):
            self.problems.append(f"{name}: not complete after {timeout:g}s")
        self.seconds[name] = round(time.monotonic() - began, 1)

    def _devices(self, class_name: str) -> list[tuple[bool, int | None]]:
        with self._app.db.reading(f"reading the devices of {class_name}") as session:
            rows = session.exec(select(Device.online, Device.model_version).where(Device.class_name == class_name))
            return [(bool(online), version) for online, version in rows.all()]

    def _wait_online(self) -> None:
        def poll() -> dict[str, Waiting]:
            state = {}
            for c in self.profiles:
                devices = self._devices(c)
                online = sum(1 for o, _ in devices if o)
                state[c] = Waiting(online, len(devices), "", done=online >= len(devices))
            return state

        self._wait("online", "online", self.options.online_timeout_s, poll)

    # ------------------------------------------------------------------ models
    def _train(self) -> TrainedModel:
        trained = train_digits(epochs=self.options.train_epochs)
        self.console.print(f"  fp32 digits model: {trained.accuracy:.2%} on the validation split")
        return trained

    def _compress(self, trained: TrainedModel) -> dict[str, BuiltModel]:
        began = time.monotonic()
        built: dict[str, BuiltModel] = {}
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[detail]}"))  # fmt: skip
        with Progress(*columns, console=self.console) as progress:
            bars = {c: progress.add_task(f"compressing for {c}", total=1, detail="waiting") for c in self.profiles}
            for name, profile in self.profiles.items():
                recipe = LADDER[0] if name == self.options.slow_class else None
                progress.update(bars[name], detail=f"{recipe['name'] if recipe else self.options.compress.value}...")
                model = compress_for_class(
                    trained, profile, mode=self.options.compress, plan_budget_s=self.options.plan_budget_s,
                    recipe=recipe,
                )  # fmt: skip
                acc = model.metrics.get("accuracy")
                progress.update(
                    bars[name],
                    completed=1,
                    detail=f"{model.recipe_label}: {len(model.onnx) / 1024:.1f} KiB"
                    + (f", accuracy {acc:.2%}" if acc is not None else ""),
                )
                built[name] = model
        for name, model in built.items():
            for note in model.notes:
                self.console.print(f"  {name}: {note}")
            if name == self.options.slow_class:
                host = model.metrics.get("latency_p95_ms_host", 0.0)
                ratio, budget = self.stories[name].device_over_host, self.profiles[name].latency_budget_ms
                slow, device = self.options.slow_factor, host * ratio
                _, now = budget_verdict(device, budget)
                _, later = budget_verdict(device * slow, budget)
                self.console.print(
                    f"  {name}: {model.recipe_label}, p95 {host:.3f} ms on this host x device/host {ratio:.3g} "
                    f"(reference workload) = {now}; {slow:g}x slower: {later}"
                )
        self.seconds["compress"] = round(time.monotonic() - began, 1)
        return built

    @staticmethod
    def _device_over_host(profile: DeviceProfile) -> float:
        """The class's fp32 device/host ratio on this host (what its simulated devices scale fp32 models by)."""
        return profile.predict_ms(1.0, host_times(), int8=False)

    def _floor(self, measured: float | None) -> float | None:
        return round(max(0.1, measured - ACCURACY_MARGIN), 3) if measured is not None else None

    # ------------------------------------------------------------------ rollouts
    def _sign(self, model: BuiltModel) -> Signed:
        return sign_artifact(
            self._app,
            onnx=model.onnx,
            class_name=model.class_name,
            model_name=MODEL,
            build_dir=self._home / "build",
            recipe=model.recipe,
            metrics=model.metrics,
            validation=self.validation,
        )

    def _start_rollout(self, artifact_id: int, class_name: str, floor: float | None) -> int:
        rollout = Rollouts(self._app.db, actor="demo").start(
            artifact_id,
            plan=rollout_plan(self.options.devices),
            gates=rollout_gates(accuracy_floor=floor),
            on_breach="abort",
        )
        assert rollout.id is not None  # noqa: S101 - just inserted
        return rollout.id

    def _first_rollouts(self, built: dict[str, BuiltModel]) -> None:
        began = time.monotonic()
        rollouts: dict[str, int] = {}
        for name, model in built.items():
            signed = self._sign(model)
            floor = self._floor(model.metrics.get("accuracy"))
            if floor is not None:
                self.floor[name] = floor
            if rollouts:
                time.sleep(STAGGER_S)  # canaries validating at once on a small host slow each other down
            rid = rollouts[name] = self._start_rollout(signed.artifact_id, name, floor)
            self.stories[name].versions.append(
                VersionStory(signed.version, model.recipe_label, "compression", model.metrics.get("accuracy"),
                             signed.size, rollout_id=rid)
            )  # fmt: skip
            self.console.print(
                f"  {name}: v{signed.version} signed ({signed.size} bytes, {signed.validation_samples} validation "
                f"samples, key {signed.key_id}); rollout {rid} in waves, canary first, abort on a gate breach"
            )
        self._live(
            "first rollouts",
            lambda: all(self._rollout_final(r) for r in rollouts.values()),
            self.options.rollout_timeout_s,
            rollouts=lambda: list(rollouts.values()),
        )
        for name, rid in rollouts.items():
            outcome = self._record_rollout(name, rid)
            version = self.stories[name].versions[-1].version
            self._event(name, f"v{version}: {self._rollout_sentence(outcome)}", version=version, rollout=outcome)
            self._refusals(name, rid)
            if outcome.state != "completed":
                self.problems.append(f"{name}: the first rollout ended {outcome.state}")
        self.seconds["first_rollouts"] = round(time.monotonic() - began, 1)
        self._first_done = time.monotonic()

    @staticmethod
    def _rollout_sentence(outcome: RolloutOutcome) -> str:
        """`rollout 1 completed, 10 active after 3 wave(s)`, with the breach when one stopped it."""
        active = outcome.devices.get("active", 0)
        text = f"rollout {outcome.rollout_id} {outcome.state}, {active} active after {outcome.waves_opened} wave(s)"
        return f"{text}; gate breach: {breach_sentence(outcome.breach)}" if outcome.breach is not None else text

    def _refusals(self, class_name: str, rollout_id: int) -> None:
        """An event for the devices of a rollout that did not take its model, per state, with the first reason."""
        with self._app.db.reading(f"reading the failures of rollout {rollout_id}") as session:
            rows = session.exec(
                select(RolloutDevice.state, DeploymentJob.detail)
                .join(DeploymentJob, col(RolloutDevice.job_id) == col(DeploymentJob.id))
                .where(RolloutDevice.rollout_id == rollout_id, col(RolloutDevice.state).in_(_REFUSED))
            ).all()
        if rows:
            states = ", ".join(f"{s.replace('_', ' ')} {n}" for s, n in sorted(Counter(r[0] for r in rows).items()))
            self._event(class_name, f"rollout {rollout_id}: {len(rows)} device(s) did not take it ({states}); "
                        f"first reason: {rows[0][1] or 'none given'}")  # fmt: skip

    def _rollout_final(self, rollout_id: int) -> bool:
        return rollout_outcome(self._app.db, rollout_id, version=0).final

    def _record_rollout(self, class_name: str, rollout_id: int) -> RolloutOutcome:
        """The rollout's outcome, written into the version of the table that it rolled out."""
        outcome = rollout_outcome(self._app.db, rollout_id, version=0)
        for v in self.stories[class_name].versions:
            if v.rollout_id == rollout_id:
                v.rollout_state, v.rollout_devices, v.waves_opened, v.breach = (
                    outcome.state, outcome.devices, outcome.waves_opened, outcome.breach
                )  # fmt: skip
        return outcome

    # ------------------------------------------------------------------ the live view
    def _overview(self) -> RenderableType:
        rows = []
        for name, profile in self.profiles.items():
            devices = self._devices(name)
            online = [v for o, v in devices if o]
            versions = Counter(online)
            top = max((v for v in versions if v is not None), key=lambda v: (versions[v], v), default=None)
            numbers = recent(self._app.db, name, version=top, seconds=RECENT_S) if top is not None else None
            rows.append(
                OverviewRow(
                    device_class=name,
                    versions=dict(versions),
                    online=len(online),
                    total=len(devices),
                    p95_ms=numbers.p95_ms if numbers else None,
                    budget_ms=profile.latency_budget_ms,
                    accuracy=numbers.accuracy if numbers else None,
                    note=self._note(name),
                )
            )
        return render_overview(rows)

    def _note(self, name: str) -> str:
        builder = self.builder
        if builder is not None and builder.progress.class_name == name:
            return f"recompressing: {builder.progress.stage}"
        events = self.stories[name].events
        return str(events[-1]) if events else ""

    def _live(
        self,
        title: str,
        until: Callable[[], bool],
        timeout: float,
        *,
        rollouts: Callable[[], list[int]] = list,
        tick: Callable[[], None] | None = None,
    ) -> bool:
        """The live view (fleet table, rollouts' status, the build's spinner) until `until()` or `timeout`."""
        end = time.monotonic() + timeout

        def view() -> Group:
            parts: list[RenderableType] = [self._overview()]
            for rid in rollouts():
                try:
                    parts.append(render_rollout(describe(self._app.db, rid)))
                except ControllerError as exc:
                    parts.append(f"rollout {rid}: {exc}")
            builder = self.builder
            if builder is not None and builder.progress.class_name is not None:
                p = builder.progress
                parts.append(Spinner("dots", f"building for {p.class_name}: {p.stage} "
                                             f"({time.monotonic() - p.started:.0f}s)"))  # fmt: skip
            parts.append(f"{title}: {max(0.0, end - time.monotonic()):.0f}s at most; Ctrl-C stops everything")
            return Group(*parts)

        done = False
        with Live(view(), console=self.console, refresh_per_second=4, transient=True) as live:
            while time.monotonic() < end:
                self._check_fleets()
                if tick is not None:
                    tick()
                if until():
                    done = True
                    break
                time.sleep(1.0)
                live.update(view())
        if not done:
            self.problems.append(f"{title}: not complete after {timeout:g}s")
        return done

    # ------------------------------------------------------------------ the planted problems
    def _plant_and_follow(self) -> None:
        began = time.monotonic()
        loop = self._app.recompression
        watches = []
        if loop is not None:
            gates_floor = min(self.floor.values(), default=None)
            loop.plan = rollout_plan(self.options.devices)
            loop.gates = rollout_gates(accuracy_floor=gates_floor)
            for name in self.profiles:
                loop.set_policy(name, demo_policy())
            self.console.print(
                f"the controller's recompression loop now watches {', '.join(self.profiles)}: p95 over budget for "
                f"{demo_policy().latency_windows} windows -> recompress and roll out (auto)"
            )
        slow, bad = self._plantable(self.options.slow_class), self._plantable(self.options.bad_class)
        if slow is not None and loop is None:
            self.problems.append("the controller runs no recompression loop: the slow class cannot recover")
        elif slow is not None:
            # once the devices' probation after their first model is over: a device still in probation would
            # roll back by itself when it turns slow (as it should), which is another story
            watches.append(_Watch(slow, "slow", plant_at=self._first_done + PROBATION_S))
        if bad is not None:
            watches.append(self._plant_bad_artifact(bad))
        if watches:
            self._live(
                "planted problems",
                lambda: all(w.done for w in watches),
                self.options.story_timeout_s,
                rollouts=lambda: [w.rollout_id for w in watches if w.rollout_id is not None],
                tick=lambda: self._follow_all(watches),
            )
            for w in watches:
                if w.rollout_id is not None:
                    self.console.print(render_rollout(describe(self._app.db, w.rollout_id)))
                    self._record_rollout(w.class_name, w.rollout_id)
        self.seconds["planted_problems"] = round(time.monotonic() - began, 1)

    def _plantable(self, name: str | None) -> str | None:
        """The class, when its first model runs (a problem is planted on a working class only)."""
        if name is None:
            return None
        last = self.stories[name].versions[-1]
        if last.rollout_state != "completed":
            self._event(name, f"nothing planted: its first rollout ({last.rollout_id}) ended "
                        f"{last.rollout_state or 'nowhere'}, not completed", version=last.version)  # fmt: skip
            return None
        return name

    def _plant_slowdown(self, watch: _Watch) -> None:
        assert self.builder is not None  # noqa: S101 - made with the app
        name = watch.class_name
        watch.planted = True
        version = self.stories[name].versions[-1].version
        base = recent(self._app.db, name, version=version, seconds=RECENT_S)
        if base.p95_ms is not None:
            self.builder.baseline[name] = base.p95_ms
        factor = self.options.slow_factor
        fleet = self.fleets[name]
        self.stopped[f"fleet {name} (pid {fleet.pid})"] = fleet.stop()
        self._start_fleet(name, fleet.spec.dataset, self._app.settings, slow=factor)
        _, before = budget_verdict(base.p95_ms, self.profiles[name].latency_budget_ms)
        self._event(name, f"planted: the devices restart {factor:g}x slower than profiled (v{version}'s p95 over "
                    f"the last {RECENT_S:g} s before: {before})", version=version)  # fmt: skip

    def _plant_bad_artifact(self, name: str) -> _Watch:
        assert self.trained is not None  # noqa: S101 - trained before
        story = self.stories[name]
        good = story.versions[-1]
        x, y = validation_arrays()
        with self._app.db.reading("reading the good artifact") as session:
            row = session.exec(select(Artifact).where(Artifact.class_name == name,
                                                      Artifact.version == good.version)).one()  # fmt: skip
        onnx = swap_labels(self._artifact_bytes(row.sha256))
        accuracy = onnx_accuracy(onnx, x, y)
        model = BuiltModel(class_name=name, onnx=onnx, recipe_label=f"{good.recipe}, labels swapped",
                           source="planted", recipe=(), metrics={"accuracy": accuracy})  # fmt: skip
        signed = self._sign(model)
        floor = self.floor.get(name)
        rid = self._start_rollout(signed.artifact_id, name, floor)
        story.versions.append(VersionStory(signed.version, model.recipe_label, "planted bad artifact", accuracy,
                                           signed.size, rollout_id=rid))  # fmt: skip
        pairs = ", ".join(f"{a}<->{b}" for a, b in SWAPPED_LABELS)
        good_accuracy = f"{good.accuracy_measured:.1%}" if good.accuracy_measured is not None else "unmeasured"
        self._event(
            name,
            f"planted: v{signed.version}, v{good.version} with labels {pairs} swapped (accuracy {accuracy:.1%} "
            f"measured here, v{good.version} {good_accuracy}), signed with {signed.validation_samples} validation "
            f"samples computed from its own outputs; rollout {rid}",
            version=signed.version,
            rollout=rollout_outcome(self._app.db, rid, version=signed.version),
        )
        return _Watch(name, "bad", rollout_id=rid)

    def _artifact_bytes(self, sha256: str) -> bytes:
        path = ArtifactStore(self._app.settings.store_dir).path_for_sha256(sha256)
        if path is None:
            raise ConfigError(f"artifact {sha256[:12]} is not in the store")
        return path.read_bytes()

    def _follow_all(self, watches: list[_Watch]) -> None:
        for watch in watches:
            if not watch.done:
                self._follow(watch)

    def _follow(self, watch: _Watch) -> None:
        if watch.kind == "bad":
            self._follow_bad(watch)
        else:
            self._follow_slow(watch)

    def _once(
        self, watch: _Watch, key: str, text: str, *, version: int | None = None, rollout: RolloutOutcome | None = None
    ) -> None:
        if key not in watch.seen:
            watch.seen.add(key)
            self._event(watch.class_name, text, version=version, rollout=rollout)

    def _follow_bad(self, watch: _Watch) -> None:
        assert watch.rollout_id is not None  # noqa: S101 - set when planted
        outcome = rollout_outcome(self._app.db, watch.rollout_id, version=0)
        if outcome.breach is not None:
            self._once(watch, "breach", f"rollout {watch.rollout_id}: gate breach: {breach_sentence(outcome.breach)};"
                       f" the rollout is {outcome.state}", rollout=outcome)  # fmt: skip
        if outcome.final:
            devices = ", ".join(f"{s.replace('_', ' ')} {n}" for s, n in outcome.devices.items()) or "no devices"
            self._once(watch, "final", f"rollout {watch.rollout_id} {outcome.state}: {devices}", rollout=outcome)
            watch.done = True

    def _follow_slow(self, watch: _Watch) -> None:
        name = watch.class_name
        if not watch.planted:
            if time.monotonic() < watch.plant_at:
                self._once(watch, "probation", f"its devices turn slow once their {PROBATION_S:g}s probation is over")
                return
            self._plant_slowdown(watch)
        found = recompressions(self._app.db, name)
        budget = self.profiles[name].latency_budget_ms
        story = self.stories[name]
        if not found:
            current = story.versions[-1].version
            numbers = recent(self._app.db, name, version=current, seconds=RECENT_S / 2)
            if numbers.p95_ms is not None and numbers.p95_ms > budget:
                self._once(watch, "over", f"v{current}'s p95 {numbers.p95_ms:.2f} ms over the {budget:g} ms budget "
                           f"({numbers.inferences} inferences in the last {RECENT_S / 2:g} s)",
                           version=current)  # fmt: skip
            return
        row = found[-1]
        self._once(watch, f"trigger {row.id}", f"recompression {row.id} triggered ({row.trigger}): {row.summary}")
        if row.state == "failed":
            self._once(watch, f"failed {row.id}", f"recompression {row.id} failed: {row.note}")
            self.problems.append(f"{name}: recompression {row.id} failed: {row.note}")
            watch.done = True
            return
        if row.rollout_id is None or row.artifact_id is None:
            return
        if watch.rollout_id != row.rollout_id:
            watch.rollout_id = row.rollout_id
            watch.version = self._recompressed(name, row.artifact_id, row.rollout_id)
        outcome = rollout_outcome(self._app.db, row.rollout_id, version=0)
        version = watch.version
        if outcome.final and version is not None:
            self._once(watch, "rolled", f"v{version}: {self._rollout_sentence(outcome)}", version=version,
                       rollout=outcome)  # fmt: skip
            if outcome.state != "completed":
                self.problems.append(f"{name}: the recompression's rollout {row.rollout_id} ended {outcome.state}")
                watch.done = True
                return
            numbers = recent(self._app.db, name, version=version, seconds=RECENT_S)
            within, verdict = budget_verdict(numbers.p95_ms, budget)
            if within and numbers.inferences >= RECOVERED_SAMPLES:
                self._once(watch, "recovered", f"recovered: v{version}'s p95 {verdict} ({numbers.inferences} "
                           f"inferences in the last {RECENT_S:g} s)", version=version)  # fmt: skip
                watch.done = True

    def _recompressed(self, name: str, artifact_id: int, rollout_id: int) -> int | None:
        """The recompression's artifact in the versions column, and how it was chosen in the story (the build's
        report is the one for that version; the recipe and size are the registry's). Its version, when found."""
        facts = {f.artifact_id: f for f in class_artifacts(self._app.db, name)}
        fact = facts.get(artifact_id)
        if fact is None:
            self.problems.append(f"{name}: the recompression's artifact {artifact_id} is not in the registry")
            return None
        builds = self.builder.builds if self.builder is not None else []
        built = next((b for b in builds if b.get("class") == name and b.get("version") == fact.version), {})
        versions = self.stories[name].versions
        if all(v.version != fact.version for v in versions):
            versions.append(
                VersionStory(
                    fact.version, fact.recipe, "recompression", fact.accuracy, fact.size, rollout_id=rollout_id
                )
            )
        predicted = built.get("predicted_p95_ms")
        _, verdict = budget_verdict(predicted, self.profiles[name].latency_budget_ms)
        how = (f"the {built.get('recipe')} rung, built in {built.get('seconds')}s: predicted p95 {verdict} at "
               f"{built.get('slowdown')}x the baseline" if built else "no build report for it")  # fmt: skip
        self._event(name, f"built v{fact.version} {fact.recipe} ({how}); rollout {rollout_id}", version=fact.version,
                    rollout=rollout_outcome(self._app.db, rollout_id, version=fact.version))  # fmt: skip
        return fact.version

    # ------------------------------------------------------------------ steady state and the end
    def _observe(self) -> None:
        began = time.monotonic()
        self.console.print(f"running for {self.options.duration_s:g}s as the fleet now is")
        end = began + self.options.duration_s
        self._live("running", lambda: time.monotonic() >= end, self.options.duration_s + 5)
        self._app.service.flush()
        self.seconds["observe"] = round(time.monotonic() - began, 1)

    def _final_numbers(self) -> None:
        for name, story in self.stories.items():
            devices = self._devices(name)
            versions = Counter(v for o, v in devices if o)
            current = max((v for v in versions if v is not None), key=lambda v: (versions[v], v), default=None)
            story.current_version = current
            story.devices_total = len(devices)
            story.devices_online = sum(1 for o, _ in devices if o)
            story.devices_on_current = versions.get(current, 0) if current is not None else 0
            if current is not None:
                numbers = recent(self._app.db, name, version=current, seconds=RECENT_S)
                story.p95_latency_ms, story.accuracy, story.labelled_samples = (
                    numbers.p95_ms, numbers.accuracy, numbers.labelled
                )  # fmt: skip
                story.within_budget = budget_verdict(numbers.p95_ms, story.latency_budget_ms)[0]
            story.recompressions = [
                {"id": r.id, "trigger": r.trigger, "summary": r.summary, "state": r.state, "rollout": r.rollout_id}
                for r in recompressions(self._app.db, name)
            ]
            self._versions_from_registry(name)
            self.problems.extend(f"{name}: the summary disagrees with its story: {d}" for d in disagreements(story))

    def _versions_from_registry(self, name: str) -> None:
        """Every artifact built for the class goes in its versions column, with its rollout's outcome. One the demo
        did not follow live (a recompression of a class it did not plant a slowdown in, an operator's) is told in
        the story too, at the time the registry built it."""
        story = self.stories[name]
        known = {v.version: v for v in story.versions}
        unfollowed = []
        for fact in class_artifacts(self._app.db, name):
            v = known.get(fact.version)
            if v is None:
                made = "recompression" if fact.recompression_id is not None else "registry"
                story.versions.append(
                    VersionStory(fact.version, fact.recipe, made, fact.accuracy, fact.size, rollout_id=fact.rollout_id)
                )
                unfollowed.append(fact)
            elif v.rollout_id is None:
                v.rollout_id = fact.rollout_id
        story.versions.sort(key=lambda v: v.version)
        outcomes = {v.rollout_id: self._record_rollout(name, v.rollout_id) for v in story.versions if v.rollout_id}
        for fact in unfollowed:
            outcome = outcomes.get(fact.rollout_id) if fact.rollout_id is not None else None
            how = f"recompression {fact.recompression_id} ({fact.trigger})"
            if fact.recompression_id is None:
                how = "none of the demo's steps"
            rolled = self._rollout_sentence(outcome) if outcome is not None else "not rolled out"
            at = (fact.created_at - self._began_utc).total_seconds()
            self._event(name, f"v{fact.version} {fact.recipe} built by {how}, not followed live; {rolled}",
                        version=fact.version, rollout=outcome, at=at)  # fmt: skip
        story.events.sort(key=lambda e: e.at_s)

    # ------------------------------------------------------------------ stopping
    @contextlib.contextmanager
    def _teardown(self) -> Iterator[None]:
        try:
            yield
        finally:
            # A second Ctrl-C or SIGTERM while stopping would leave processes behind (the fleets run in sessions of
            # their own): both are ignored until everything is stopped.
            main = threading.current_thread() is threading.main_thread()
            previous = (
                {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
            )
            try:
                with self.console.status("stopping the fleets, the controller and the broker..."):
                    self._stop_all()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            self.console.print("[green]✓[/] stopped everything the demo started")

    def _stop_all(self) -> None:
        for name, fleet in self.fleets.items():
            try:
                self.stopped[f"fleet {name} (pid {fleet.pid})"] = fleet.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                self.problems.append(f"stopping the {name} fleet: {exc}")
        if self.app is not None:
            try:
                self.app.stop()
                self.stopped["controller"] = "stopped"
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                self.problems.append(f"stopping the controller: {exc}")
        if self.broker.managed is not None:
            pid = self.broker.managed.pid
            self.broker.managed.stop()
            self.stopped[f"mosquitto (pid {pid})"] = "stopped"

    def _remove_home(self, *, keep: bool) -> None:
        if self.home is None or self.options.home is not None or self.options.keep_home:
            return
        if keep:
            self.console.print(f"kept {self.home} to look at (logs in {self.home / 'logs'})")
            return
        shutil.rmtree(self.home, ignore_errors=True)
