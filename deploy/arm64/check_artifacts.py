"""The device side of `make check-arm64`: check a bundle's artifacts with the agent's own code, as a device would.

Runs wherever `edgefleet[agent]` is installed (the arm64 chroot under qemu, and natively on the controller for
comparison); it imports only the agent, the wire contract, numpy and the standard library. For each artifact, in a
fresh process of its own (so that its peak RSS is that artifact's):

1. the signed manifest is verified with the trusted public key (`agent.trust.load_trusted_keys`,
   `agent.steps.verify_signed`: key, Ed25519 signature, expiry, version, class, opset, onnxruntime, storage);
2. the artifact goes through a `Download` block by block (each block's sha256 from the manifest) and
   `verify_download` (size and sha256 of the whole file), then into a slot (`install_into_slot`);
3. `agent.validate.validate_model` runs the manifest's validation samples against the tolerances, on a
   `ModelRunner` of the installed slot, and the slot is activated when it passes.

The latency budget is not applied (`latency_budget_ms=None`): a time under emulation says nothing about a device's.
The p95 is still measured and reported. Results go to `--out` as JSON and to stdout as one line per artifact; the
exit status is 1 when any verdict differs from the one `index.json` expects.

    python deploy/arm64/check_artifacts.py build/arm64/bundle --out build/arm64/bundle/x86.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_TIMEOUT_S = 900.0  # one artifact under emulation takes tens of seconds; a hang must not hold `make` forever


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB. Under qemu-user this is the host process: the emulator's own memory (its
    # translated-code cache) is included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_one(directory: Path, *, bundle: Path, threads: int) -> dict[str, Any]:
    """Verify, install and validate one artifact; the verdict and measurements as a dict."""
    from edgefleet.agent.download import Download
    from edgefleet.agent.runner import ModelRunner
    from edgefleet.agent.slots import Slots
    from edgefleet.agent.steps import install_into_slot, verify_download, verify_signed
    from edgefleet.agent.trust import load_trusted_keys
    from edgefleet.agent.validate import validate_model
    from edgefleet.protocols.errors import VerificationError
    from edgefleet.protocols.manifest import SignedManifest
    from edgefleet.protocols.profile import load_profile

    began = time.perf_counter()
    trusted = load_trusted_keys([str(bundle / "controller.pub")])
    profile = load_profile(bundle / "rpi4.toml")
    result: dict[str, Any] = {"name": directory.name}
    try:
        signed = SignedManifest.model_validate_json((directory / "manifest.json").read_bytes())
        manifest = verify_signed(
            signed, trusted_keys=trusted, now=dt.datetime.now(dt.UTC), current_version=None,
            allow_rollback=False, profile=profile,
        )  # fmt: skip
    except (VerificationError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        return {**result, "verdict": "rejected", "stage": "manifest", "detail": f"{type(exc).__name__}: {exc}"}
    data = (directory / "model.onnx").read_bytes()
    with tempfile.TemporaryDirectory(prefix="edgefleet-arm64-") as tmp:
        download = Download(
            Path(tmp) / "downloads", artifact=manifest.sha256, size=manifest.size_bytes,
            block_size=manifest.block_size, block_hashes=manifest.block_sha256, durable=False,
        )  # fmt: skip
        for index in range(download.count):
            download.accept(index, data[index * manifest.block_size : (index + 1) * manifest.block_size])
        download.close()
        try:
            verify_download(manifest, download)
        except VerificationError as exc:
            detail = f"{type(exc).__name__}: {exc} ({download.rejected} blocks failed their sha256)"
            return {**result, "verdict": "rejected", "stage": "artifact", "detail": detail}
        slots = Slots(Path(tmp) / "slots", durable=False)
        target = slots.inactive_name()
        install_into_slot(slots, download, manifest)
        info = slots.info(target)
        if info is None or info.digest != manifest.sha256:
            return {**result, "verdict": "rejected", "stage": "install", "detail": "the slot does not hold it"}
        runner = ModelRunner(info.model_path, threads=threads)
        outcome = validate_model(runner, manifest, latency_budget_ms=None)
        if outcome.ok:
            slots.activate(target)
    return {
        **result,
        "verdict": "passed" if outcome.ok else "failed",
        "stage": "validation",
        "detail": outcome.detail,
        "agreement": outcome.agreement,
        "close": outcome.close,
        "samples": len(manifest.validation_samples),
        "p95_ms": outcome.p95_latency_ms,
        "seconds": time.perf_counter() - began,
    }


def baseline() -> dict[str, Any]:
    """The RSS of an agent process that has imported what the checks use, with no model loaded."""
    import numpy as np
    import onnxruntime as ort

    from edgefleet.agent import runner, steps, validate  # noqa: F401 - imported for their memory

    return {"name": "(agent imports, no model)", "numpy": np.__version__, "onnxruntime": ort.__version__}


def _child(args: argparse.Namespace) -> int:
    result = baseline() if args.one is None else check_one(args.one, bundle=args.bundle, threads=args.threads)
    result["peak_rss_mb"] = _peak_rss_mb()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _run_child(bundle: Path, one: Path | None, *, threads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, str(bundle), "--threads", str(threads)]
    command += ["--baseline"] if one is None else ["--one", str(one)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"verdict": "error", "detail": f"no result within {_TIMEOUT_S:.0f} s"}
    if done.returncode != 0:
        return {"verdict": "error", "detail": done.stderr.strip().splitlines()[-1:] or f"exit {done.returncode}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _verdict_ok(expect: str, verdict: str) -> bool:
    return {"pass": "passed", "fail": "failed", "reject": "rejected"}[expect] == verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the directory make_artifacts.py wrote")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # the child: one artifact directory
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # the child: no model
    args = parser.parse_args(argv)
    if args.one is not None or args.baseline:
        return _child(args)
    index = json.loads((args.bundle / "index.json").read_text(encoding="utf-8"))
    base = _run_child(args.bundle, None, threads=args.threads)
    results, mismatches = [], 0
    for entry in index["artifacts"]:
        result = {**entry, **_run_child(args.bundle, args.bundle / "artifacts" / entry["name"], threads=args.threads)}
        result["as_expected"] = _verdict_ok(entry["expect"], result.get("verdict", "error"))
        mismatches += not result["as_expected"]
        results.append(result)
        mark = "ok" if result["as_expected"] else "UNEXPECTED"
        sys.stdout.write(
            f"{platform.machine()}: {entry['name']}: {result.get('verdict')} ({mark}): {result.get('detail')}\n"
        )
        sys.stdout.flush()
    report = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "threads": args.threads,
        "baseline": base,
        "results": results,
        "mismatches": mismatches,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
