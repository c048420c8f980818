"""The device's command line, `edgefleet-agent`: run the agent, simulate a fleet, measure this device.

argparse rather than typer: the agent install carries nothing beyond paho-mqtt, onnxruntime, numpy,
pydantic and cryptography. Errors print one line (no traceback) and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from edgefleet.agent.config import AgentConfig, Faults
from edgefleet.agent.errors import AgentError
from edgefleet.protocols.errors import ProtocolError
from edgefleet.protocols.profile import DeviceProfile, load_profile

__all__ = ["build_parser", "main"]

PROFILE_DIRS_ENV = "EDGEFLEET_PROFILES"
# The same defaults as the controller's (controller/config.py): a device and `edgefleet serve` meet without options.
DEFAULT_FLEET = "default"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883


def resolve_profile(value: str) -> DeviceProfile:
    """A profile file path, or a class name looked up in $EDGEFLEET_PROFILES and ./deploy/profiles."""
    path = Path(value)
    if path.suffix == ".toml" or path.exists():
        return load_profile(path)
    dirs = [Path(d) for d in os.environ.get(PROFILE_DIRS_ENV, "").split(os.pathsep) if d]
    dirs.append(Path("deploy/profiles"))
    for directory in dirs:
        candidate = directory / f"{value}.toml"
        if candidate.exists():
            return load_profile(candidate)
    raise AgentError(
        f"no profile for class {value!r}: give a .toml path, "
        f"or put {value}.toml in ${PROFILE_DIRS_ENV} or deploy/profiles"
    )


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help=f"MQTT broker host (default: the credentials file's, else {DEFAULT_HOST})")
    p.add_argument("--port", type=int, help=f"MQTT broker port (default: the credentials file's, else {DEFAULT_PORT})")
    p.add_argument("--tls-ca", type=Path, help="CA file (PEM) the broker's certificate must chain to: connect over TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for a broker that requires one")
    p.add_argument("--tls-key", type=Path, help="the client certificate's private key (PEM; default: in --tls-cert)")
    p.add_argument(
        "--fleet",
        help=f"fleet id, the topic root (default: the credentials file's, else {DEFAULT_FLEET!r}, as the controller's)",
    )
    p.add_argument("--class", dest="device_class", required=True, help="device class: profile name or .toml path")
    p.add_argument("--trusted-key", action="append", default=[], help="controller public key (PEM file or hex)")
    p.add_argument("--telemetry-window", type=float, default=10.0, help="seconds per telemetry window")
    p.add_argument("--dataset", type=Path, help=".npz with inputs `x` and labels `y` to replay")
    p.add_argument("--rate", type=float, default=1.0, help="inferences per second per inferring device")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log detail")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help says it already or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default in (argparse.SUPPRESS, []):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="Run compressed models on this device; download, verify, activate, report, roll back.",
        formatter_class=_DefaultsFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    run = sub.add_parser("run", help="run the agent on this device", formatter_class=_DefaultsFormatter)
    _connection_args(run)
    run.add_argument("--device", required=True, help="device id (also the MQTT username and client id)")
    run.add_argument("--password-file", type=Path, help="file holding this device's MQTT password")
    run.add_argument(
        "--credentials",
        type=Path,
        help="CSV from `edgefleet device register --out`: this device's row gives its password, fleet, host, port",
    )
    run.add_argument("--data-dir", type=Path, default=Path("/var/lib/edgefleet-agent"), help="state and slots")
    run.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")

    sim = sub.add_parser(
        "simulate", help="run many simulated devices in one process", formatter_class=_DefaultsFormatter
    )
    _connection_args(sim)
    sim.add_argument("--devices", type=int, help="how many devices (default: every row of --credentials)")
    sim.add_argument(
        "--credentials", type=Path, help="CSV from `edgefleet device register --out`: ids and passwords to log in with"
    )
    sim.add_argument("--data-dir", type=Path, default=Path("sim-data"), help="one sub-directory per device")
    sim.add_argument("--id-prefix", help="device ids are PREFIX-00000... (default: the class name)")
    sim.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    sim.add_argument(
        "--infer-fraction",
        type=float,
        default=1.0,
        help="share of devices that run inference (default: all; rollout gates need their samples)",
    )
    sim.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines (0: none)")
    sim.add_argument("--connect-rate", type=float, default=1000.0, help="new connections per second")
    sim.add_argument("--fault-devices", type=int, default=0, help="inject the faults below into the first K devices")
    sim.add_argument("--drop-at", type=float, help="drop the connection at this fraction of a download")
    sim.add_argument("--crash-install", action="store_true", help="crash (and reboot) in the middle of installing")
    sim.add_argument("--corrupt-block", type=int, action="append", default=[], help="corrupt this block index once")
    sim.add_argument("--slow", type=float, default=1.0, help="multiply inference latency by this factor")

    speed = sub.add_parser(
        "speed-factor",
        help="time this device on the reference workload: the [profile.reference_ms] table",
        formatter_class=_DefaultsFormatter,
    )
    speed.add_argument("--threads", type=int, default=1, help="intra-op threads: the class profile's `threads`")
    speed.add_argument("--rounds", type=int, default=7, help="rounds of timed runs (the lowest median counts)")
    speed.add_argument("--json", action="store_true", help="one JSON object: the times and what they ran on")
    return parser


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the loop cleanly; the previous handlers come back afterwards."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run(args: argparse.Namespace) -> int:
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.credentials import read_credentials
    from edgefleet.agent.reactor import Reactor
    from edgefleet.agent.replay import load_dataset
    from edgefleet.agent.trust import load_trusted_keys

    password = _read_password(args.password_file) if args.password_file else None
    fleet, host, port = None, None, None
    if args.credentials is not None:
        mine = [c for c in read_credentials(args.credentials) if c.device_id == args.device]
        if not mine:
            raise AgentError(f"{args.credentials} holds no row for device {args.device!r}")
        password = password or mine[0].password
        fleet, host, port = mine[0].fleet, mine[0].mqtt_host, mine[0].mqtt_port
    profile = resolve_profile(args.device_class)
    config = AgentConfig(
        fleet=args.fleet or fleet or DEFAULT_FLEET,
        device_id=args.device,
        profile=profile,
        data_dir=args.data_dir,
        host=args.host or host or DEFAULT_HOST,
        port=args.port or port or DEFAULT_PORT,
        password=password,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        trusted_keys=load_trusted_keys(args.trusted_key),
        telemetry_window_s=args.telemetry_window,
    )
    config.tls_context()  # a missing or bad TLS file: one clear error before anything starts
    reactor = Reactor()
    agent = Agent(config, reactor=reactor)
    agent.start()
    dataset = load_dataset(args.dataset) if args.dataset else None
    counter = [0]

    def tick() -> None:
        if dataset is not None and agent.slots.current_name() is not None:
            x, label = dataset.sample(counter[0])
            counter[0] += 1
            try:
                agent.infer(x, label=label)
            except AgentError as exc:
                logging.getLogger(__name__).warning("inference failed: %s", exc)
        reactor.call_later(1.0 / max(args.rate, 1e-3), tick)

    if dataset is not None:
        tick()
    with _stop_on_signals(reactor.stop):
        reactor.run(timeout=args.duration)
    agent.stop()
    reactor.run(timeout=0.5)
    agent.link.close()
    reactor.close()
    return 0


def _read_password(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentError(f"cannot read the password file {path} ({getattr(exc, 'strerror', None) or exc})") from exc


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _simulate(args: argparse.Namespace) -> int:
    from edgefleet.agent.credentials import connection_of, read_credentials
    from edgefleet.agent.replay import load_dataset
    from edgefleet.agent.simulator import FleetSimulator, SimulatorSpec
    from edgefleet.agent.trust import load_trusted_keys

    profile = resolve_profile(args.device_class)
    credentials = read_credentials(args.credentials, device_class=profile.name) if args.credentials else []
    devices = args.devices if args.devices is not None else len(credentials)
    if devices <= 0:
        raise AgentError("give --devices N (N >= 1) or a --credentials file")
    if credentials and devices > len(credentials):
        raise AgentError(f"--devices {devices} but {args.credentials} holds {len(credentials)} for this class")
    _raise_nofile(devices + 256)
    fleet, host, port = connection_of(credentials, source=args.credentials) if credentials else (None, None, None)
    spec = SimulatorSpec(
        devices=devices,
        device_ids=tuple(c.device_id for c in credentials[:devices]),
        passwords={c.device_id: c.password for c in credentials[:devices]},
        profile=profile,
        data_root=args.data_dir,
        fleet=args.fleet or fleet or DEFAULT_FLEET,
        host=args.host or host or DEFAULT_HOST,
        port=args.port or port or DEFAULT_PORT,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        id_prefix=args.id_prefix,
        trusted_keys=load_trusted_keys(args.trusted_key),
        telemetry_window_s=args.telemetry_window,
        dataset=load_dataset(args.dataset) if args.dataset else None,
        infer_fraction=args.infer_fraction,
        infer_rate_hz=args.rate,
        connect_rate_per_s=args.connect_rate,
        fault_devices=args.fault_devices,
        faults=Faults(
            drop_at_fraction=args.drop_at,
            crash_during_install=args.crash_install,
            corrupt_blocks=frozenset(args.corrupt_block),
            slow_factor=args.slow,
        ),
    )
    if not 0 <= args.progress_every <= 86400:
        raise AgentError("--progress-every must be 0..86400 seconds")
    sim = FleetSimulator(spec)
    log = logging.getLogger("edgefleet.agent.simulate")
    log.info(
        "simulating %d %s device(s) of fleet %s on %s:%d (%d inferring)",
        devices, profile.name, spec.fleet, spec.host, spec.port, round(devices * spec.infer_fraction),
    )  # fmt: skip
    sim.start()

    def progress() -> None:
        log.info("%s", sim.summary())  # one line per interval, whatever the fleet size
        sim.reactor.call_later(args.progress_every, progress)

    if args.progress_every > 0:
        sim.reactor.call_later(args.progress_every, progress)
    with _stop_on_signals(sim.reactor.stop):
        sim.run(duration=args.duration)
    print(sim.summary())  # noqa: T201
    sim.stop()
    return 0


def _speed_factor(args: argparse.Namespace) -> int:
    import json

    from edgefleet.agent.speed import describe_host, time_workload

    if not 1 <= args.threads <= 256 or not 1 <= args.rounds <= 100:
        raise AgentError("--threads must be 1..256 and --rounds 1..100")
    times = time_workload(threads=args.threads, rounds=args.rounds)
    host = describe_host(args.threads)
    if args.json:
        print(json.dumps({"reference_ms": times.model_dump(), **host}))  # noqa: T201
        return 0
    isa = ", ".join(host["isa"]) or "none of avx2/avx512/vnni/asimddp/i8mm"
    print(f"# {host['cpu']} ({isa}), onnxruntime {host['onnxruntime']}, {args.threads} thread(s)")  # noqa: T201
    print("[profile.reference_ms]")  # noqa: T201
    for name, ms in times.model_dump().items():
        print(f"{name} = {ms:g}")  # noqa: T201
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    level = getattr(args, "log_level", "warning")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    verbs = {"run": _run, "simulate": _simulate, "speed-factor": _speed_factor}
    try:
        return verbs[args.verb](args)
    except (AgentError, ProtocolError, OSError) as exc:
        print(f"edgefleet-agent {args.verb}: {exc}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    sys.exit(main())
