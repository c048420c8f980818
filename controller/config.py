"""Controller settings, from flags, then `EDGEFLEET_*` environment variables, then a TOML file, then defaults.

The TOML file is `<home>/edgefleet.toml` unless `--config`/`EDGEFLEET_CONFIG` names another; its keys are the
field names of `Settings`, at the top level::

    database_url = "postgresql+psycopg://edgefleet@db.example/edgefleet"
    mqtt_host = "broker.example"
    mqtt_port = 1883
    metrics_port = 9464
    fleet = "plant-a"
    shared_subscriptions = true
    recompress = true             # the closed loop: telemetry triggers recompression (see docs/operations.md)
    recompress_interval_s = 5.0
    # TLS (docs/operations.md, "MQTT over TLS"; with mqtt_port = 8883): the controller checks the broker against
    # mqtt_tls_ca and presents mqtt_tls_cert/mqtt_tls_key when the broker wants a client certificate; `broker
    # config` writes a TLS listener from broker_tls_cert/broker_tls_key (client certificates checked against
    # broker_tls_ca, else mqtt_tls_ca; required with broker_tls_require_certificate = true).
    mqtt_tls_ca = "/etc/edgefleet/tls/ca.crt"

A TLS file that is set but missing or unreadable is a ConfigError when the settings are loaded.

Example::

    settings = load_settings(flags={"home": "/tmp/ef"}, env=os.environ)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgefleet.controller.errors import ConfigError

__all__ = ["ENV_PREFIX", "BrokerTls", "MqttTls", "Settings", "convert_setting", "load_settings"]

ENV_PREFIX = "EDGEFLEET_"
CONFIG_FILE_NAME = "edgefleet.toml"
CONTROLLER_USERNAME = "edgefleet-controller"
# The CLI publishes (deploys) under its own name: with `use_username_as_clientid` a second connection of the
# service's user would take over the running service's session.
CLI_USERNAME = "edgefleet-cli"


@dataclasses.dataclass(frozen=True, slots=True)
class MqttTls:
    """A client's TLS files: the CA the broker's certificate must chain to, an optional client certificate/key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None  # None with a cert: the key is in the certificate file


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerTls:
    """A TLS listener's files: the broker's certificate and key, and the CA client certificates chain to."""

    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the controller needs to know about where it lives and whom it talks to."""

    home: Path
    database_url: str | None = None
    db_timeout: float = 5.0
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_client_id: str = "edgefleet-controller"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    fleet: str = "default"
    shared_subscriptions: bool = False
    shared_group: str = "edgefleet"
    telemetry_window_s: int = 60
    telemetry_retention_days: float = 7.0
    flush_interval_s: float = 0.5
    flush_every: int = 5000
    # The recompression loop (`edgefleet serve --recompress/--no-recompress`, `--recompress-interval`).
    recompress: bool = True
    recompress_interval_s: float = 5.0
    # MQTT over TLS (all None: plaintext, the default).
    mqtt_tls_ca: Path | None = None
    mqtt_tls_cert: Path | None = None
    mqtt_tls_key: Path | None = None
    broker_tls_ca: Path | None = None
    broker_tls_cert: Path | None = None
    broker_tls_key: Path | None = None
    broker_tls_require_certificate: bool = False

    def __post_init__(self) -> None:
        if self.mqtt_tls_ca is None and (self.mqtt_tls_cert is not None or self.mqtt_tls_key is not None):
            raise ConfigError("mqtt_tls_cert/mqtt_tls_key need mqtt_tls_ca (the CA the broker's certificate chains to)")
        if self.mqtt_tls_key is not None and self.mqtt_tls_cert is None:
            raise ConfigError("mqtt_tls_key needs mqtt_tls_cert")
        if (self.broker_tls_cert is None) != (self.broker_tls_key is None):
            raise ConfigError("broker_tls_cert and broker_tls_key go together (the broker's certificate and key)")

    @property
    def mqtt_tls(self) -> MqttTls | None:
        """The controller's TLS files for its MQTT connections, or None for plaintext."""
        if self.mqtt_tls_ca is None:
            return None
        return MqttTls(self.mqtt_tls_ca, self.mqtt_tls_cert, self.mqtt_tls_key)

    @property
    def broker_tls(self) -> BrokerTls | None:
        """The TLS listener `broker config` writes, or None for a plaintext one."""
        if self.broker_tls_cert is None or self.broker_tls_key is None:
            return None
        ca = self.broker_tls_ca or self.mqtt_tls_ca
        if ca is None:
            raise ConfigError("a TLS listener needs a CA file: set broker_tls_ca (or mqtt_tls_ca)")
        return BrokerTls(ca, self.broker_tls_cert, self.broker_tls_key, self.broker_tls_require_certificate)

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL: the one given, else a SQLite file in the home directory."""
        return self.database_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def store_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def key_path(self) -> Path:
        return self.home / "keys" / "controller.ed25519"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def controller_secret_path(self) -> Path:
        """Where `broker config` keeps the controller's own MQTT password (mode 0600)."""
        return self.home / "keys" / "mqtt-controller.secret"

    def mqtt_credentials(self, *, cli: bool = False) -> tuple[str | None, str | None]:
        """Username and password for the controller's (or, with `cli`, the CLI's) MQTT connection.

        Explicit settings win; otherwise the users written by `broker config`, when their secret exists.
        """
        if self.mqtt_username is not None:
            return self.mqtt_username, self.mqtt_password
        try:
            secret = self.controller_secret_path.read_text(encoding="utf-8").strip()
        except OSError:
            return None, None
        return (CLI_USERNAME if cli else CONTROLLER_USERNAME), secret


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _to_str(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[no-any-return]
    if not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {type(value).__name__}")  # noqa: TRY004 - reported as ConfigError
    return str(value)


def _readable_file(value: Any) -> Path:
    path = Path(_to_str(value)).expanduser()
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except IsADirectoryError as exc:
        raise ValueError(f"{path} is a directory, not a PEM file") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return path


def _positive_float(value: Any) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("expected a number > 0")
    return number


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "home": lambda v: Path(_to_str(v)).expanduser(),
    "database_url": _to_str,
    "db_timeout": float,
    "mqtt_host": _to_str,
    "mqtt_port": int,
    "mqtt_username": _to_str,
    "mqtt_password": _to_str,
    "mqtt_client_id": _to_str,
    "metrics_host": _to_str,
    "metrics_port": int,
    "fleet": _to_str,
    "shared_subscriptions": _to_bool,
    "shared_group": _to_str,
    "telemetry_window_s": int,
    "telemetry_retention_days": float,
    "flush_interval_s": _positive_float,
    "flush_every": int,
    "recompress": _to_bool,
    "recompress_interval_s": _positive_float,
    "mqtt_tls_ca": _readable_file,
    "mqtt_tls_cert": _readable_file,
    "mqtt_tls_key": _readable_file,
    "broker_tls_ca": _readable_file,
    "broker_tls_cert": _readable_file,
    "broker_tls_key": _readable_file,
    "broker_tls_require_certificate": _to_bool,
}


def convert_setting(name: str, value: Any, source: str) -> Any:
    """One setting's value checked and converted as `load_settings` does (ConfigError naming `source`)."""
    if name not in _CONVERT:
        raise ConfigError(f"unknown setting {name}")
    return _convert(name, value, source)


def _convert(name: str, value: Any, source: str) -> Any:
    try:
        return _CONVERT[name](value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name} = {value!r} is not valid ({exc})") from exc


def _read_toml(path: Path, *, required: bool) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        if required:
            raise ConfigError(f"config file {path} does not exist") from exc
        return {}
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc})") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc})") from exc
    unknown = sorted(set(data) - set(_CONVERT))
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {', '.join(unknown)} (known: {', '.join(_CONVERT)})")
    return data


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    default_home: Path | None = None,
) -> Settings:
    """Merge flags > EDGEFLEET_* env > TOML file > defaults. `None` flag values count as not given."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = sorted(set(given) - set(_CONVERT))
    if unknown:
        raise ConfigError(f"unknown settings {', '.join(unknown)}")
    environ = {name: env[ENV_PREFIX + name.upper()] for name in _CONVERT if env and ENV_PREFIX + name.upper() in env}
    env_config = env.get(ENV_PREFIX + "CONFIG") if env else None
    explicit = config_file or (Path(env_config).expanduser() if env_config else None)

    home_from = given.get("home", environ.get("home"))
    file_data = _read_toml(explicit, required=True) if explicit is not None else {}
    if home_from is None:
        home_from = file_data.get("home")
    home = _convert("home", home_from, "home") if home_from is not None else (default_home or Path("~/.edgefleet"))
    home = Path(home).expanduser()
    if explicit is None:
        file_data = _read_toml(home / CONFIG_FILE_NAME, required=False)
    values: dict[str, Any] = {"home": home}
    for name in _CONVERT:
        if name == "home":
            continue
        if name in given:
            values[name] = _convert(name, given[name], "flag")
        elif name in environ:
            values[name] = _convert(name, environ[name], f"environment {ENV_PREFIX}{name.upper()}")
        elif name in file_data:
            values[name] = _convert(name, file_data[name], "config file")
    return Settings(**values)
