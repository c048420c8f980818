"""`edgefleet demo`: the whole product on one machine, end to end, in a few minutes.

Steps: a temporary edgefleet home (registry, signing key); the simulated devices registered, each one's password
kept in a 0600 CSV per class in the home (a kept home run again reuses them, see `demo_credentials`); a Mosquitto
of its own on a free port, configured as `edgefleet broker config` configures one (per-device passwords and ACLs,
anonymous clients refused); the controller (`ControllerApp`: MQTT service, block server, metrics endpoint) in this
process, logged in as its own broker user; one `edgefleet-agent simulate --credentials` process per device class;
the digits example trained once and compressed per class; the artifacts signed, stored and deployed to every
device of their class; the devices download, verify, validate, activate, infer on labelled samples and report; a
table per class. Everything it started is stopped by PID at the end, on Ctrl-C or SIGTERM. With `--mqtt-port` it
uses that broker instead, as its owner configured it (the devices connect to it anonymously).

Example::

    summary = Demo(DemoOptions(duration_s=30, devices=5), console=Console()).run()
    summary.ok, summary.classes[0].devices_active
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from rich.console import Console, Group
from rich.live import Live

from edgefleet.controller.app import ControllerApp
from edgefleet.controller.broker_config import controller_secret
from edgefleet.controller.config import Settings
from edgefleet.controller.demo_credentials import credentials_path
from edgefleet.controller.demo_fleet import FleetSpec, SimulatedFleet
from edgefleet.controller.demo_models import (
    BuiltModel,
    CompressMode,
    TrainedModel,
    compress_for_class,
    train_digits,
    write_validation_set,
)
from edgefleet.controller.demo_report import (
    ClassReport,
    ClassTarget,
    Waiting,
    class_report,
    device_counts,
    render_table,
    wait_with_bars,
)
from edgefleet.controller.demo_setup import (
    BrokerChoice,
    check_configured_broker,
    demo_settings,
    prepare_registry,
    sign_and_deploy,
    simulation_profile,
    start_managed_broker,
)
from edgefleet.controller.home import init_home
from edgefleet.controller.keys import public_key_path
from edgefleet.controller.mosquitto import free_port
from edgefleet.controller.registry import Registry
from edgefleet.controller.state_updates import FINAL_JOB_STATES
from edgefleet.protocols.profile import DeviceProfile

__all__ = ["Demo", "DemoOptions", "DemoSummary"]

log = logging.getLogger(__name__)

MODEL = "digits"


def default_profiles_dir() -> Path:
    """deploy/profiles of this checkout (the package is installed from the repository), else of the cwd."""
    here = Path(__file__).resolve().parents[1] / "deploy" / "profiles"
    return here if here.is_dir() else Path("deploy/profiles")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    duration_s: float = 60.0
    devices: int = 10
    classes: tuple[str, ...] = ("rpi4", "cortex-a53")
    home: Path | None = None
    keep_home: bool = False
    broker: tuple[str, int] | None = None  # a broker to use instead of a managed one
    compress: CompressMode = CompressMode.recipe
    plan_budget_s: float = 30.0
    train_epochs: int = 4
    telemetry_window_s: float = 5.0
    rate_hz: float = 1.0
    online_timeout_s: float = 60.0
    deploy_timeout_s: float = 120.0
    fleet: str = "demo"
    profiles_dir: Path = dataclasses.field(default_factory=default_profiles_dir)


@dataclasses.dataclass(slots=True)
class DemoSummary:
    ok: bool
    home: str
    broker: str
    broker_auth: str
    metrics_url: str
    seconds: dict[str, float]
    classes: list[ClassReport]
    problems: list[str]
    stopped: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        value = dataclasses.asdict(self)
        value["classes"] = [c.as_dict() for c in self.classes]
        return value


class Demo:
    """One run of the demo; `run()` returns the summary and has stopped everything by then."""

    def __init__(self, options: DemoOptions, *, console: Console) -> None:
        self.options = options
        self.console = console
        self.seconds: dict[str, float] = {}
        self.problems: list[str] = []
        self.fleets: list[SimulatedFleet] = []
        self.stopped: dict[str, Any] = {}
        self.app: ControllerApp | None = None
        self.home = options.home
        self.broker = BrokerChoice(host="127.0.0.1", port=0, auth="not started", managed=None)

    # ------------------------------------------------------------------ the whole run
    def run(self) -> DemoSummary:
        began = time.monotonic()
        reports: list[ClassReport] = []
        failed = True
        try:
            with self._teardown():
                profiles = self._setup()
                trained = self._step("train", "training the digits example", self._train)
                built = self._compress(trained, profiles)
                targets = self._step("deploy", "signing, storing and deploying", lambda: self._deploy(built, profiles))
                self._wait_active(targets)
                self._observe(targets)
                reports = self._reports(targets)
                failed = False
        finally:
            self.seconds["total"] = round(time.monotonic() - began, 1)
            self._remove_home(keep=failed or not self._all_good(reports))
        return self._summary(reports)

    def _summary(self, reports: list[ClassReport]) -> DemoSummary:
        app = self.app
        metrics = f"http://{app.settings.metrics_host}:{app.settings.metrics_port}/metrics" if app else ""
        return DemoSummary(
            ok=self._all_good(reports),
            home=str(self.home),
            broker=f"{self.broker.host}:{self.broker.port}",
            broker_auth=self.broker.auth,
            metrics_url=metrics,
            seconds=self.seconds,
            classes=reports,
            problems=self.problems,
            stopped=self.stopped,
        )

    def _all_good(self, reports: list[ClassReport]) -> bool:
        return (
            bool(reports)
            and not self.problems
            and all(r.devices_active == r.devices_total and r.telemetry_messages > 0 for r in reports)
        )

    def _step(self, name: str, text: str, func: Callable[[], Any]) -> Any:
        began = time.monotonic()
        with self.console.status(f"{text}..."):
            result = func()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - began, 1)
        self.console.print(f"[green]✓[/] {text} ({time.monotonic() - began:.1f}s)")
        return result

    # ------------------------------------------------------------------ setting up
    def _setup(self) -> dict[str, DeviceProfile]:
        began = time.monotonic()
        if self.home is None:
            self.home = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
        self.console.print(f"edgefleet home [bold]{self.home}[/]")
        settings, profiles = self._start_broker_and_controller(self.home)
        dataset = write_validation_set(self.home / "digits-val.npz")
        self._start_fleets(profiles, dataset, settings)
        self.seconds["setup"] = round(time.monotonic() - began, 1)
        self._wait_online()
        return profiles

    def _start_broker_and_controller(self, home: Path) -> tuple[Settings, dict[str, DeviceProfile]]:
        """Registry rows and device passwords first: the managed broker's password file is written from them."""
        options = self.options
        configured = check_configured_broker(*options.broker) if options.broker is not None else None
        host, port = (configured.host, configured.port) if configured is not None else ("127.0.0.1", free_port())
        settings = demo_settings(home, mqtt_host=host, mqtt_port=port, fleet=options.fleet)
        init_home(settings)
        if configured is None:
            controller_secret(settings)  # before the app is built: it reads its MQTT login from there
        app = self.app = ControllerApp(settings, registry=CollectorRegistry())
        profiles = prepare_registry(
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
        self.broker = configured or start_managed_broker(settings, Registry(app.db, actor="demo"))
        where = "managed mosquitto" if self.broker.managed else "configured broker"
        pid = f", pid {self.broker.managed.pid}" if self.broker.managed else ""
        self.console.print(f"[green]✓[/] {where} on {host}:{port}{pid} ({self.broker.auth})")
        app.start()
        self.console.print(
            f"[green]✓[/] controller up; metrics on http://{settings.metrics_host}:{settings.metrics_port}/metrics"
        )
        return settings, profiles

    def _start_fleets(self, profiles: dict[str, DeviceProfile], dataset: Path, settings: Settings) -> None:
        assert self.home is not None  # noqa: S101 - set by _setup
        for name in profiles:
            spec = FleetSpec(
                class_name=name,
                profile_path=simulation_profile(self.options.profiles_dir / f"{name}.toml", self.home / "profiles"),
                devices=self.options.devices,
                host=self.broker.host,
                port=self.broker.port,
                fleet=self.options.fleet,
                trusted_key=public_key_path(settings.key_path),
                dataset=dataset,
                data_dir=self.home / "devices" / name,
                log_path=self.home / "logs" / f"simulate-{name}.log",
                telemetry_window_s=self.options.telemetry_window_s,
                rate_hz=self.options.rate_hz,
                # a configured broker is the user's: devices connect to it anonymously, as they always have
                credentials=credentials_path(self.home, name) if self.broker.managed else None,
            )
            fleet = SimulatedFleet.start(spec)
            self.fleets.append(fleet)
            self.console.print(f"[green]✓[/] simulated {name} fleet: {spec.devices} devices, pid {fleet.pid}")

    def _wait(self, name: str, title: str, timeout: float, poll: Callable[[], dict[str, Waiting]]) -> None:
        """Bars until every class is done; a timeout is counted as a problem, and the demo goes on."""
        began = time.monotonic()

        def check() -> None:
            for fleet in self.fleets:
                fleet.check()

        if not wait_with_bars(self.console, title, poll, classes=self._classes, timeout=timeout, check=check):
            self.problems.append(f"{name}: not complete after {timeout:g}s")
        self.seconds[name] = round(time.monotonic() - began, 1)

    @property
    def _classes(self) -> tuple[str, ...]:
        return self.options.classes

    def _wait_online(self) -> None:
        assert self.app is not None  # noqa: S101 - started by _setup
        db = self.app.db

        def poll() -> dict[str, Waiting]:
            state = {}
            for c in self._classes:
                total, online, _ = device_counts(db, c, -1)
                state[c] = Waiting(online, total, "", done=online >= total)
            return state

        self._wait("online", "online", self.options.online_timeout_s, poll)

    # ------------------------------------------------------------------ models
    def _train(self) -> TrainedModel:
        trained = train_digits(epochs=self.options.train_epochs)
        self.console.print(f"  fp32 digits model: {trained.accuracy:.2%} on the validation split")
        return trained

    def _compress(self, trained: TrainedModel, profiles: dict[str, DeviceProfile]) -> list[BuiltModel]:
        built = []
        for name, profile in profiles.items():
            mode = self.options.compress
            build = functools.partial(
                compress_for_class, trained, profile, mode=mode, plan_budget_s=self.options.plan_budget_s
            )
            model: BuiltModel = self._step("compress", f"compressing for {name} ({mode.value})", build)
            acc = model.metrics.get("accuracy")
            self.console.print(
                f"  {name}: {model.source} chose {model.recipe_label}: {len(model.onnx) / 1024:.1f} KiB"
                + (f", accuracy {acc:.2%}" if acc is not None else "")
            )
            for note in model.notes:
                self.console.print(f"  note: {note}")
            built.append(model)
        return built

    # ------------------------------------------------------------------ deploying and watching
    def _deploy(self, built: list[BuiltModel], profiles: dict[str, DeviceProfile]) -> list[ClassTarget]:
        assert self.app is not None  # noqa: S101 - started by _setup
        assert self.home is not None  # noqa: S101 - set by _setup
        targets = []
        for model in built:
            budget = profiles[model.class_name].latency_budget_ms
            done = sign_and_deploy(self.app, model, build_dir=self.home / "build", model_name=MODEL, budget_ms=budget)
            self.problems.extend(done.errors)
            targets.append(done.target)
            t = done.target
            self.console.print(
                f"  {t.class_name}: v{t.version}, {t.artifact_bytes} bytes, sha256 {done.sha256[:12]}, "
                f"key {done.key_id} -> {len(t.job_ids)} devices"
            )
        return targets

    def _wait_active(self, targets: list[ClassTarget]) -> None:
        assert self.app is not None  # noqa: S101 - started by _setup
        app = self.app

        def poll() -> dict[str, Waiting]:
            state = {}
            for t in targets:
                r = class_report(t, db=app.db, registry=app.registry)
                ended = sum(n for s, n in r.jobs.items() if s in FINAL_JOB_STATES)
                detail = ", ".join(f"{s} {n}" for s, n in sorted(r.jobs.items()))
                state[t.class_name] = Waiting(r.devices_active, r.devices_total, detail, done=ended >= len(t.job_ids))
            return state

        self._wait("deploy_wait", "active", self.options.deploy_timeout_s, poll)

    def _observe(self, targets: list[ClassTarget]) -> None:
        assert self.app is not None  # noqa: S101 - started by _setup
        app = self.app
        began = time.monotonic()
        end = began + self.options.duration_s
        self.console.print(f"running for {self.options.duration_s:g}s: devices infer on labelled digits and report")

        def view() -> Group:
            left = max(0.0, end - time.monotonic())
            tables = [render_table(class_report(t, db=app.db, registry=app.registry)) for t in targets]
            return Group(*tables, f"{left:.0f}s left; Ctrl-C stops everything")

        with Live(view(), console=self.console, refresh_per_second=1, transient=True) as live:
            while time.monotonic() < end:
                for fleet in self.fleets:
                    fleet.check()
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                live.update(view())
        app.service.flush()
        self.seconds["observe"] = round(time.monotonic() - began, 1)

    def _reports(self, targets: list[ClassTarget]) -> list[ClassReport]:
        assert self.app is not None  # noqa: S101 - started by _setup
        return [class_report(t, db=self.app.db, registry=self.app.registry) for t in targets]

    # ------------------------------------------------------------------ stopping
    @contextlib.contextmanager
    def _teardown(self) -> Iterator[None]:
        try:
            yield
        finally:
            # A second Ctrl-C while stopping would leave processes behind: ignore it until all is stopped.
            main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                with self.console.status("stopping the fleets, the controller and the broker..."):
                    self._stop_all()
            finally:
                if main:
                    signal.signal(signal.SIGINT, previous)
            self.console.print("[green]✓[/] stopped everything the demo started")

    def _stop_all(self) -> None:
        for fleet in self.fleets:
            try:
                self.stopped[f"fleet {fleet.spec.class_name} (pid {fleet.pid})"] = fleet.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                self.problems.append(f"stopping the {fleet.spec.class_name} fleet: {exc}")
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
