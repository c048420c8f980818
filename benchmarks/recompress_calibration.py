"""Calibrating the class profiles for the closed loop: field p95 of each model in the simulator vs the planner's.

The simulator reports latency = host latency (its own onnxruntime run, 1 thread) x the class speed factor (x a fault
`slow_factor`); the planner predicts p95 = host p95 measured back-to-back on a quiet thread x the speed factor.
Under the field's load (~30 simulated devices at 1 inference/s each, three simulator processes, on 2 cores) the
host part is slower than the planner's quiet measurement. This measures, for the digits example:

- the planner's host p95 of fp32, of the demo's fixed recipes and of the planner's pick per shipped profile;
- the host p95 of the same models under field load: 3 processes (one per class) of 10 devices at 1 Hz each, the
  simulator's own `ModelRunner` on the replayed validation inputs;

and writes the table (and field p95 x speed factor against each budget) to docs/benchmarks.md.

    .venv/bin/python benchmarks/recompress_calibration.py [--seconds 60] [--plan-budget 40]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

PROFILES = ROOT / "deploy" / "profiles"
CLASSES = ("x86-gateway", "rpi4", "cortex-a53")
SLOW = 2.5


def _field(paths: list[str], seconds: float, rate_hz: float, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    """One simulator process: devices at `rate_hz` in all, round-robin over `paths`; host seconds per model."""
    from edgefleet.agent.runner import ModelRunner
    from edgefleet.controller.demo_models import validation_arrays

    x, _ = validation_arrays()
    runners = [ModelRunner(Path(p), threads=1) for p in paths]
    times: dict[str, list[float]] = {p: [] for p in paths}
    period = 1.0 / rate_hz
    start = time.monotonic()
    k = 0
    while (now := time.monotonic()) - start < seconds:
        due = start + k * period
        if due > now:
            time.sleep(due - now)
        i = k % len(runners)
        _, latency = runners[i].run_raw(x[k % len(x) : k % len(x) + 1])
        times[paths[i]].append(latency)
        k += 1
    queue.put(times)


def field_p95(paths: list[str], *, seconds: float, processes: int = 3, rate_hz: float = 10.0) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_field, args=(paths, seconds, rate_hz, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    merged: dict[str, list[float]] = {p: [] for p in paths}
    for _ in procs:
        for path, values in queue.get(timeout=seconds + 120).items():
            merged[path] += values
    for p in procs:
        p.join(30)
    return {p: float(np.percentile(v, 95) * 1000) for p, v in merged.items()}


def _judge(p95_ms: float, budget_ms: float) -> str:
    from edgefleet.controller.rollout_gates import p95_bound
    from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, bucket_index

    counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
    counts[bucket_index(p95_ms / 1000)] = 1
    bound = p95_bound(counts) * 1000
    verdict = "over" if bound > budget_ms else "within"
    return f"{p95_ms:.2f} ms (bucket {bound:g}: {verdict})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--plan-budget", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ef-calib-")))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from edgefleet.compression import compress, parse_recipe
    from edgefleet.controller.demo_models import CompressMode, compress_for_class, train_digits
    from edgefleet.protocols.profile import load_profile

    t0 = time.monotonic()
    trained = train_digits(epochs=4)
    print(f"trained digits in {time.monotonic() - t0:.0f}s, accuracy {trained.accuracy:.3f}", flush=True)
    models: dict[str, tuple[bytes, float, float]] = {}  # label -> onnx, planner host p95, accuracy
    onnx, report = compress(trained.module, parse_recipe({"name": "fp32", "passes": []}), trained.task,
                            threads=1, latency_runs=200, rss=False)  # fmt: skip
    models["fp32"] = (onnx, report.result.latency_p95_ms, report.result.accuracy)
    profiles = {name: load_profile(PROFILES / f"{name}.toml") for name in CLASSES}
    for name in ("rpi4", "cortex-a53"):
        built = compress_for_class(trained, profiles[name], mode=CompressMode.recipe)
        models[f"fixed {name}: {built.recipe_label}"] = (
            built.onnx, built.metrics["latency_p95_ms_host"], built.metrics["accuracy"]
        )  # fmt: skip
    picks: dict[str, str] = {}
    for name in CLASSES:
        t = time.monotonic()
        built = compress_for_class(trained, profiles[name], mode=CompressMode.planner, plan_budget_s=args.plan_budget)
        label = f"pick {name}: {built.recipe_label} ({built.source})"
        picks[name] = label
        models[label] = (built.onnx, built.metrics["latency_p95_ms_host"], built.metrics["accuracy"])
        print(f"{label}: {time.monotonic() - t:.0f}s, {built.metrics}", flush=True)
    paths = {}
    for i, (label, (data, _, _)) in enumerate(models.items()):
        path = args.out / f"m{i}.onnx"
        path.write_bytes(data)
        paths[label] = str(path)
    field = field_p95(list(paths.values()), seconds=args.seconds)
    rows = []
    for label, (_, host, acc) in models.items():
        f = field[paths[label]]
        rows.append({"model": label, "planner_host_p95_ms": host, "field_host_p95_ms": f, "accuracy": acc})
    (args.out / "calibration.json").write_text(json.dumps({"rows": rows, "picks": picks}, indent=2))
    header = "| model | accuracy | planner host p95 (ms, quiet, 1 thr) | field host p95 (ms, 30 dev at 1 Hz) | ratio |"
    lines = [header, "|---|---|---|---|---|"]
    for r in rows:
        ratio = r["field_host_p95_ms"] / r["planner_host_p95_ms"]
        lines.append(f"| {r['model']} | {r['accuracy']:.3f} | {r['planner_host_p95_ms']:.3f} | "
                     f"{r['field_host_p95_ms']:.3f} | {ratio:.2f} |")  # fmt: skip
    field_of = {r["model"]: r["field_host_p95_ms"] for r in rows}
    quarter = next(v for k, v in field_of.items() if k.startswith("fixed rpi4"))
    lines += [
        "",
        "Simulated field p95 = field host p95 x speed factor (x 2.5 on the planted slow devices), judged like the",
        "trigger and the gate: by the upper bound of its telemetry bucket against the budget.",
        "",
        "| class | speed factor | budget (ms) | planner's pick | pick | fp32 x2.5 | quarter-width x2.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in CLASSES:
        p = profiles[name]
        sf, budget = p.speed_factor, p.latency_budget_ms
        pick = field_of[picks[name]] * sf
        slow_fp32 = field_of["fp32"] * sf * SLOW
        slow_quarter = quarter * sf * SLOW
        lines.append(
            f"| {name} | {sf:g} | {budget:g} | {picks[name].split(': ', 1)[1]} | {_judge(pick, budget)} | "
            f"{_judge(slow_fp32, budget)} | {_judge(slow_quarter, budget)} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("recompress-calibration", "Closed-loop calibration: planner vs simulated field latency", body)


if __name__ == "__main__":
    main()
