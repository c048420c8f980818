"""Speed model on two hosts: a class's predicted and simulated p95 stay the device's, whichever host works them out.

A device's latency is predicted as `host p95 x device/host`, device and host timed on the same reference workload
(agent/speed.py, compression/host_speed.py); a simulated device reports its host compute x the same ratio. If the
model is right, neither number moves with the host. This checks it on the digits students the demo uses (full-,
half- and quarter-width, fp32 and static int8; untrained: compute does not depend on the weights), for every shipped
class, on each host setting, each in a child process of its own:

- `native`: this machine as it is;
- `busy-core`: the same with a `while :; do :; done` loop keeping one core busy (what a shared CI machine is like);
- `haswell`: this machine's binary under `qemu-x86_64-static -cpu Haswell` (AVX2, no AVX-512, no VNNI: onnxruntime
  picks its AVX2 int8 kernels, and everything runs 10-50x slower under emulation, which is the point: the ratios must
  hold on a very different host). Skipped, and said so, where qemu-user-static is missing.

The child times the reference workload (one thread), then each model as the planner does (compression/measure.py at
one thread, lowest p95 of three) and as a simulated device does (agent/runner.py with the class's scale, 200 runs
spaced by a short sleep). The tables give predicted and simulated p95 per host, their spread across hosts, and
simulated / predicted per host, and go to docs/benchmarks.md.

    .venv/bin/python benchmarks/speed_model.py [--hosts native,busy-core,haswell] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

CLASSES = ("x86-gateway", "rpi4", "cortex-a53")
WIDTHS = (1.0, 0.5, 0.25)
HOSTS = ("native", "busy-core", "haswell")
QEMU = "qemu-x86_64-static"


def build_models(out: Path) -> dict[str, Path]:
    """The students at three widths, fp32 and static int8 (onnxruntime's quantizer via the compression pass)."""
    import numpy as np
    import torch

    from edgefleet.compression.examples.digits import DigitsNet, digits_task
    from edgefleet.compression.export import export_onnx
    from edgefleet.compression.quantize import static_int8
    from edgefleet.compression.recipe import QuantizeStaticConfig

    task = digits_task()
    torch.manual_seed(0)
    models = {}
    for width in WIDTHS:
        fp32 = export_onnx(DigitsNet(width=width).eval(), np.zeros((1, *task.x_val.shape[1:]), dtype=np.float32))
        int8 = static_int8(fp32, task.x_train[:128], QuantizeStaticConfig())
        for label, data in ((f"w{width:g} fp32", fp32), (f"w{width:g} int8", int8)):
            path = out / f"{label.replace(' ', '-')}.onnx"
            path.write_bytes(data)
            models[label] = path
    return models


def child(models: dict[str, str]) -> dict[str, object]:
    """On this host: the reference times, and per model its planner host p95 and per class its simulated p95."""
    import numpy as np

    from edgefleet.agent.runner import ModelRunner
    from edgefleet.agent.speed import SimulatedSpeed, WorkloadTimer
    from edgefleet.compression.examples.digits import digits_task
    from edgefleet.compression.measure import measure
    from edgefleet.protocols.profile import load_profile

    task = digits_task()
    host = WorkloadTimer(threads=1).time()
    profiles = {name: load_profile(ROOT / "deploy" / "profiles" / f"{name}.toml") for name in CLASSES}
    out: dict[str, object] = {"host": host.model_dump(), "models": {}}
    x = task.x_val[:1]
    for label, path in models.items():
        data = Path(path).read_bytes()
        planner = min(measure(data, task, threads=1, runs=200, rss=False).latency_p95_ms for _ in range(3))
        row: dict[str, object] = {"host_p95_ms": planner, "predicted": {}, "simulated": {}}
        for name, profile in profiles.items():
            speed = SimulatedSpeed(profile, host)
            int8 = label.endswith("int8")
            row["predicted"][name] = profile.predict_ms(planner, host, int8=int8)  # type: ignore[index]
            runner = ModelRunner(Path(path), threads=1, latency_scale=speed.scaler(Path(path)))
            times = []
            for _ in range(200):
                time.sleep(0.002)
                times.append(runner.run_raw(x)[1] * 1000)
            row["simulated"][name] = float(np.percentile(times, 95))  # type: ignore[index]
        out["models"][label] = row  # type: ignore[index]
    return out


def run_host(kind: str, models: dict[str, Path]) -> dict[str, object] | str:
    """One child on one host setting; a string says why it was skipped or failed."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps({k: str(v) for k, v in models.items()}),
    ]
    busy = None
    if kind == "haswell":
        if shutil.which(QEMU) is None:
            return f"skipped: {QEMU} is not installed (Debian's qemu-user-static)"
        command = [QEMU, "-cpu", "Haswell", *command]
    if kind == "busy-core":
        busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def tables(results: dict[str, dict[str, object]], skipped: dict[str, str]) -> str:
    hosts = list(results)
    lines = ["Reference workload at one thread (ms, median of the lowest round), per host:", ""]
    lines += ["| host | fp32_conv | fp32_matmul | int8_conv | int8_matmul |", "|---|---|---|---|---|"]
    for h in hosts:
        ref = results[h]["host"]
        lines.append(f"| {h} | " + " | ".join(f"{ref[k]:.4f}" for k in ref) + " |")  # type: ignore[index,attr-defined]
    for h, why in skipped.items():
        lines.append(f"| {h} | {why} | | | |")
    lines += [
        "",
        "Per class and model: the predicted device p95 (host p95 x device/host) and the simulated field p95 (ms) on",
        "each host; *spread* is max / min of the predictions across hosts (1.00: the host does not matter), *sim/pred*",
        "the largest simulated / predicted on any host.",
        "",
    ]
    head = " | ".join(f"{h} pred / sim" for h in hosts)
    lines += [f"| class | model | {head} | spread | sim/pred |", "|---|---|" + "---|" * len(hosts) + "---|---|"]
    spreads, fits = [], []
    labels = list(results[hosts[0]]["models"])  # type: ignore[call-overload]
    for name in CLASSES:
        for label in labels:
            pred = [results[h]["models"][label]["predicted"][name] for h in hosts]  # type: ignore[index]
            sim = [results[h]["models"][label]["simulated"][name] for h in hosts]  # type: ignore[index]
            spread = max(pred) / min(pred)
            worst = max(s / p for s, p in zip(sim, pred, strict=True))
            spreads.append(spread)
            fits.append(worst)
            cells = " | ".join(f"{p:.3f} / {s:.3f}" for p, s in zip(pred, sim, strict=True))
            lines.append(f"| {name} | {label} | {cells} | {spread:.2f} | {worst:.2f} |")
    med_spread, med_fit = statistics.median(spreads), statistics.median(fits)
    lines += [
        "",
        (
            f"Across {len(spreads)} class x model pairs: prediction spread across hosts median {med_spread:.2f}, "
            f"worst {max(spreads):.2f}; simulated / predicted median {med_fit:.2f}, worst {max(fits):.2f}."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default=",".join(HOSTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    with tempfile.TemporaryDirectory(prefix="ef-speed-") as tmp:
        models = build_models(Path(tmp))
        results: dict[str, dict[str, object]] = {}
        skipped: dict[str, str] = {}
        for kind in [h.strip() for h in args.hosts.split(",") if h.strip()]:
            began = time.monotonic()
            outcome = run_host(kind, models)
            print(f"{kind}: {time.monotonic() - began:.0f} s", flush=True)
            if isinstance(outcome, str):
                skipped[kind] = outcome
            else:
                results[kind] = outcome
    if not results:
        raise SystemExit(f"no host ran: {skipped}")
    body = tables(results, skipped)
    print(body)
    if not args.no_write:
        write_section("speed-model", "Speed model on two hosts: predicted vs simulated device p95", body)


if __name__ == "__main__":
    main()
