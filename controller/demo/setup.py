"""The demo's set-up: its broker (a managed Mosquitto, or one configured), its registry rows, and signing and
storing each model it builds (with validation samples the devices check) as the next artifact of its class.

The managed broker runs under the security a real fleet gets from `edgefleet broker config`: the demo registers its
simulated devices (keeping each password in a 0600 CSV per class, see `demo_credentials`), writes the password file
and ACLs of every registered device, and starts that broker, which refuses anonymous clients. The controller logs in
as its own user and each `edgefleet-agent simulate` with `--credentials`. A configured broker (`--mqtt-port`) is
the user's: devices connect to it anonymously, as before, and whether it lets them is its owner's business.

Example::

    profiles = prepare_registry(db, fleet="demo", classes=("rpi4",), devices=10, profiles_dir=p, model="digits",
                                home=home, mqtt_host="127.0.0.1", mqtt_port=port)
    broker = start_managed_broker(settings, Registry(db, actor="demo"))
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import JsonValue

from edgefleet.controller.artifacts.catalog import ArtifactCatalog
from edgefleet.controller.artifacts.keys import load_signing_key
from edgefleet.controller.artifacts.store import ArtifactStore
from edgefleet.controller.artifacts.validation_set import ValidationSet
from edgefleet.controller.broker.config import managed_broker, write_broker_config
from edgefleet.controller.broker.mosquitto import ManagedMosquitto, free_port, port_answers
from edgefleet.controller.config import Settings
from edgefleet.controller.data.db import Database
from edgefleet.controller.data.registry import Registry
from edgefleet.controller.demo.credentials import credentials_path, ensure_credentials
from edgefleet.controller.demo.fleet import simulated_ids
from edgefleet.controller.errors import BrokerError, ConfigError, NotFoundError
from edgefleet.controller.service.app import ControllerApp
from edgefleet.protocols.errors import ProtocolError
from edgefleet.protocols.profile import DeviceProfile, load_profile

__all__ = [
    "CONFIGURED_AUTH",
    "MANAGED_AUTH",
    "BrokerChoice",
    "Signed",
    "check_configured_broker",
    "demo_settings",
    "prepare_registry",
    "sign_artifact",
    "simulation_profile",
    "start_managed_broker",
]

_THREADS_LINE = re.compile(r"^threads\s*=\s*\d+\s*$", re.MULTILINE)


MANAGED_AUTH = "per-device passwords and ACLs, anonymous clients refused"
CONFIGURED_AUTH = "as its owner configured it; the devices connect anonymously"


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerChoice:
    host: str
    port: int
    auth: str
    managed: ManagedMosquitto | None


def demo_settings(home: Path, *, mqtt_host: str, mqtt_port: int, fleet: str, rollup_window_s: int = 5) -> Settings:
    """The controller's settings in the demo: a free metrics port, telemetry flushed twice a second and rolled up in
    short windows (the recompression trigger counts consecutive windows over budget: minutes would not fit)."""
    return Settings(
        home=home,
        mqtt_host=mqtt_host,
        mqtt_port=mqtt_port,
        metrics_port=free_port(),
        fleet=fleet,
        mqtt_client_id=f"edgefleet-controller-{fleet}",
        flush_interval_s=0.5,
        telemetry_window_s=rollup_window_s,
    )


def check_configured_broker(host: str, port: int) -> BrokerChoice:
    """A broker the user runs (`--mqtt-port`): it must answer; its security is its owner's business."""
    if not port_answers(host, port, timeout=2.0):
        raise ConfigError(f"the configured MQTT broker {host}:{port} does not answer")
    return BrokerChoice(host, port, CONFIGURED_AUTH, None)


def start_managed_broker(settings: Settings, registry: Registry) -> BrokerChoice:
    """Write the broker config of every registered device (`edgefleet broker config`) and start that broker.

    It listens on `settings.mqtt_host:mqtt_port` and uses `<home>/broker`: mosquitto.conf (`allow_anonymous
    false`), passwd (the registry's hashes and the controller's users) and acl (each device its own topics).
    """
    files = write_broker_config(settings, registry.broker_accounts())
    broker = managed_broker(settings)
    try:
        broker.start()
    except BrokerError as exc:
        raise ConfigError(
            f"{exc} (config: {files.config}, log: {broker.log_path}); or point the demo at a broker with --mqtt-port"
        ) from exc
    return BrokerChoice(broker.host, broker.port, MANAGED_AUTH, broker)


def _profile(profiles_dir: Path, name: str) -> DeviceProfile:
    path = profiles_dir / f"{name}.toml"
    try:
        profile = load_profile(path)
    except (ProtocolError, OSError) as exc:
        raise ConfigError(f"device class {name}: cannot load its profile {path} ({exc})") from exc
    if profile.name != name:
        raise ConfigError(f"{path} describes class {profile.name!r}, not {name!r}")
    return profile


def simulation_profile(source: Path, dest_dir: Path) -> Path:
    """A copy of a class profile for the simulator, with `threads = 1`.

    A simulated device scales its host timings by device / host on the reference workload, the host timed *at one
    thread* (agent/speed.py), so it runs its model on one host thread. At the class's own thread count (4 for
    rpi4) on a small, busy host the threads only wait for each other, and the scaled latency is meaningless.
    """
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the profile {source} ({exc.strerror or exc})") from exc
    text, found = _THREADS_LINE.subn("threads = 1", text)
    dest = dest_dir / source.name
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    if found != 1 or load_profile(dest).threads != 1:
        raise ConfigError(f"{source}: expected one `threads = N` line in its [profile] table")
    return dest


def prepare_registry(
    db: Database,
    *,
    fleet: str,
    classes: Sequence[str],
    devices: int,
    profiles_dir: Path,
    model: str,
    home: Path,
    mqtt_host: str,
    mqtt_port: int,
) -> dict[str, DeviceProfile]:
    """Classes, the simulated devices and the model, each added only when missing (a kept home can be reused).

    Each class's device passwords are kept in `credentials_path(home, class)` for `simulate --credentials`.
    """
    registry = Registry(db, actor="demo")
    registry.ensure_fleet(fleet)
    known = {row.name for row, _ in registry.list_classes()}
    profiles = {}
    for name in classes:
        profile = profiles[name] = _profile(profiles_dir, name)
        if name not in known:
            registry.add_class(profile)
        ensure_credentials(
            registry,
            class_name=name,
            fleet=fleet,
            ids=simulated_ids(name, devices),
            path=credentials_path(home, name),
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
        )
    try:
        registry.get_model(model)
    except NotFoundError:
        registry.add_model(model, source=f"example:{model}", task="classification")
    return profiles


@dataclasses.dataclass(frozen=True, slots=True)
class Signed:
    """An artifact the demo stored and signed (the next version of its class)."""

    artifact_id: int
    class_name: str
    version: int
    size: int
    sha256: str
    key_id: str
    validation_samples: int


def sign_artifact(
    app: ControllerApp,
    *,
    onnx: bytes,
    class_name: str,
    model_name: str,
    build_dir: Path,
    recipe: tuple[dict[str, JsonValue], ...] = (),
    metrics: Mapping[str, float] | None = None,
    validation: ValidationSet | None = None,
    actor: str = "demo",
) -> Signed:
    """Store and sign `onnx` as the next version of its class, with validation samples computed from this model
    (the devices run them before switching: a model that does not agree with itself, or is too slow, never runs)."""
    settings = app.settings
    catalog = ArtifactCatalog(
        app.db, store=ArtifactStore(settings.store_dir), signing_key=load_signing_key(settings.key_path), actor=actor
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / f"{model_name}-{class_name}-{secrets.token_hex(4)}.onnx"
    path.write_bytes(onnx)
    artifact = catalog.add_from_onnx(
        model_name, class_name=class_name, onnx_path=path, recipe=recipe, metrics=metrics, validation=validation
    )
    samples = len(ArtifactCatalog.signed_manifest(artifact).manifest.validation_samples)
    return Signed(
        artifact.id or 0, class_name, artifact.version, artifact.size, artifact.sha256, artifact.key_id, samples
    )
