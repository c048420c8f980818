"""This host's times on the reference workload, the denominator of every device latency the planner predicts.

The planner predicts a device's p95 as `host p95 x device/host` for the model's path (protocols/profile.py), where
device and host are times on the same fixed reference workload (agent/workload/). The host's times are measured by
the very code a device runs (`edgefleet-agent speed-factor --threads 1 --json`), in a subprocess: the same
measurement on both sides, no torch threads or planner memory in the way, and compression imports nothing of the
agent's. The result is cached per host (CPU model and instruction-set flags, onnxruntime version, the workload's
digest) under `$XDG_CACHE_HOME/edgefleet/host-reference` for `max_age_s` (10 minutes): plans in a row share one
measurement, while a plan later on times the host again, in the load it then has, as its candidates are timed (a
busy host is slower on both, and the ratio is the device's).

    host = host_reference()                       # ReferenceTimes, milliseconds at one thread
    profile.predict_ms(0.25, host, int8=False)    # the device p95 of a model taking 0.25 ms here
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import ValidationError

from edgefleet.compression.errors import CompressionError
from edgefleet.protocols.profile import ReferenceTimes

__all__ = ["HostSpeedError", "default_host_cache", "host_key", "host_reference"]

log = logging.getLogger(__name__)


class HostSpeedError(CompressionError):
    """The reference workload could not be timed on this host."""


def default_host_cache() -> Path:
    """$XDG_CACHE_HOME/edgefleet/host-reference (~/.cache/edgefleet/host-reference)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgefleet" / "host-reference"


def _workload_index() -> bytes:
    """workload.json of the installed agent (read as a file: compression does not import the agent)."""
    spec = importlib.util.find_spec("edgefleet.agent")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        index = Path(location) / "workload" / "workload.json"
        if index.is_file():
            return index.read_bytes()
    raise HostSpeedError("the agent's reference workload (edgefleet/agent/workload) is not installed")


def host_key(threads: int = 1) -> str:
    """What a cached measurement is valid for: this CPU, its ISA flags, onnxruntime, the workload, the threads."""
    import onnxruntime as ort

    cpu = ""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        wanted = ("model name", "flags", "Features", "CPU part", "CPU implementer")
        cpu = "\n".join(sorted({line for line in lines if line.split(":", 1)[0].strip() in wanted}))
    except OSError:
        cpu = os.uname().machine
    digest = hashlib.sha256()
    for part in (cpu, ort.__version__, str(threads), _workload_index().decode("utf-8", "replace")):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _measure(threads: int, timeout_s: float) -> ReferenceTimes:
    command = [sys.executable, "-m", "edgefleet.agent.cli", "speed-factor", "--threads", str(threads), "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostSpeedError(f"cannot time the reference workload on this host: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HostSpeedError(f"timing the reference workload on this host failed: {tail}")
    try:
        return ReferenceTimes.model_validate(json.loads(done.stdout)["reference_ms"])
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise HostSpeedError(f"the reference timing printed something unexpected: {exc}") from exc


def host_reference(
    *,
    threads: int = 1,
    cache_dir: Path | None = None,
    refresh: bool = False,
    timeout_s: float = 120.0,
    max_age_s: float = 600.0,
) -> ReferenceTimes:
    """This host's reference times at `threads` threads: from the cache when fresh, else measured (then cached)."""
    path = (cache_dir or default_host_cache()) / f"{host_key(threads)}.json"
    if not refresh:
        try:
            if time.time() - path.stat().st_mtime <= max_age_s:
                return ReferenceTimes.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            pass  # missing, unreadable or broken: measure again and replace it
    times = _measure(threads, timeout_s)
    log.info("reference workload on this host at %d thread(s): %s", threads, times)
    _write_cache(path, times)
    return times


def _write_cache(path: Path, times: ReferenceTimes) -> None:
    """Atomically (a temporary file renamed over it); a read-only or full cache costs a re-measure, nothing else."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            tmp = Path(handle.name)
            handle.write(times.model_dump_json())
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot cache the host's reference times in %s: %s", path.parent, exc)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
