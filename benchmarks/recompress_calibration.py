"""Calibrating the class profiles for the closed loop: field p95 of each model in the simulator vs the planner's.

A simulated device reports latency = the model's warm host compute time (the thread's CPU time of the lower of two
runs right after the one that gives the outputs: agent/runner.py) x device/host on the reference workload for the
model's path (x a fault `slow_factor`); the planner predicts p95 = host p95 measured back-to-back on one thread x the
same device/host. This measures, for the digits example:

- the planner's host p95 of fp32, of the demo's ladder (full-, half-, quarter-width students: the rpi4 story starts
  on the first, its recompression takes the first rung predicted to fit), of the cortex-a53 fixed recipe and of the
  planner's pick per shipped profile;
- the host p95 of the same models under field load, timed as a simulated device times them: 3 processes (one per
  class) of 10 devices at 1 Hz each, the simulator's own scaled `ModelRunner` on the replayed validation inputs;

and writes the tables (field p95 x device/host against each budget, the rpi4 story's margins, and the ratio the
speed-factor trigger would observe) to docs/benchmarks.md.

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
PROBE_SCALE = 2.0  # any scale != 1 times the way a simulated device does; divided out again below


def _field(paths: list[str], seconds: float, rate_hz: float, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    """One simulator process: devices at `rate_hz` in all, round-robin over `paths`; host seconds per model."""
    from edgefleet.agent.runner import ModelRunner
    from edgefleet.controller.demo.models import validation_arrays

    x, _ = validation_arrays()
    runners = [ModelRunner(Path(p), threads=1, latency_scale=PROBE_SCALE) for p in paths]
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
        times[paths[i]].append(latency / PROBE_SCALE)
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


def _bound(p95_ms: float) -> float:
    """The upper bound (ms) of the telemetry bucket holding `p95_ms`: what the trigger and the gates compare."""
    from edgefleet.controller.rollout.gates import p95_bound
    from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, bucket_index

    counts = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
    counts[bucket_index(p95_ms / 1000)] = 1
    return p95_bound(counts) * 1000


def _judge(p95_ms: float, budget_ms: float) -> str:
    """p95, its bucket's verdict against the budget, and the margin (budget / p95 within, p95 / budget over)."""
    bound = _bound(p95_ms)
    if bound > budget_ms:
        return f"{p95_ms:.2f} ms (bucket {bound:g}: over, {p95_ms / budget_ms:.2f}x)"
    return f"{p95_ms:.2f} ms (bucket {bound:g}: within, {budget_ms / p95_ms:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--plan-budget", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ef-calib-")))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from edgefleet.agent.speed import is_int8_model
    from edgefleet.compression import compress, parse_recipe
    from edgefleet.compression.host_speed import host_reference
    from edgefleet.controller.demo.builder import FIT_MARGIN, choose_rung
    from edgefleet.controller.demo.models import (
        LADDER,
        CompressMode,
        compress_for_class,
        recipe_width,
        train_digits,
        width_latency_ms,
    )
    from edgefleet.protocols.profile import load_profile

    t0 = time.monotonic()
    trained = train_digits(epochs=4)
    print(f"trained digits in {time.monotonic() - t0:.0f}s, accuracy {trained.accuracy:.3f}", flush=True)
    models: dict[str, tuple[bytes, float, float]] = {}  # label -> onnx, planner host p95, accuracy
    predicted: dict[str, float] = {}  # label -> the planner's predicted device p95 (ms), for planner picks
    onnx, report = compress(trained.module, parse_recipe({"name": "fp32", "passes": []}), trained.task,
                            threads=1, latency_runs=200, rss=False)  # fmt: skip
    models["fp32"] = (onnx, report.result.latency_p95_ms, report.result.accuracy)
    profiles = {name: load_profile(PROFILES / f"{name}.toml") for name in CLASSES}
    rungs: list[str] = []
    for rung in LADDER:
        built = compress_for_class(trained, profiles["rpi4"], mode=CompressMode.recipe, recipe=rung)
        label = f"ladder {rung['name']}"
        rungs.append(label)
        models[label] = (built.onnx, built.metrics["latency_p95_ms_host"], built.metrics["accuracy"])
    built = compress_for_class(trained, profiles["cortex-a53"], mode=CompressMode.recipe)
    models[f"fixed cortex-a53: {built.recipe_label}"] = (
        built.onnx, built.metrics["latency_p95_ms_host"], built.metrics["accuracy"]
    )  # fmt: skip
    picks: dict[str, str] = {}
    for name in CLASSES:
        t = time.monotonic()
        built = compress_for_class(trained, profiles[name], mode=CompressMode.planner, plan_budget_s=args.plan_budget)
        label = f"pick {name}: {built.recipe_label} ({built.source})"
        picks[name] = label
        models[label] = (built.onnx, built.metrics["latency_p95_ms_host"], built.metrics["accuracy"])
        if "predicted_latency_ms" in built.metrics:
            predicted[label] = built.metrics["predicted_latency_ms"]
        print(f"{label}: {time.monotonic() - t:.0f}s, {built.metrics}", flush=True)
    paths = {}
    for i, (label, (data, _, _)) in enumerate(models.items()):
        path = args.out / f"m{i}.onnx"
        path.write_bytes(data)
        paths[label] = str(path)
    host_ref = host_reference()
    print(f"host reference (1 thread): {host_ref}", flush=True)

    def dev_over_host(name: str, label: str) -> float:
        return profiles[name].predict_ms(1.0, host_ref, int8=is_int8_model(Path(paths[label])))

    field = field_p95(list(paths.values()), seconds=args.seconds)
    rows = []
    for label, (_, host, acc) in models.items():
        f = field[paths[label]]
        rows.append({"model": label, "planner_host_p95_ms": host, "field_host_p95_ms": f, "accuracy": acc})
    header = "| model | accuracy | planner host p95 (ms, quiet, 1 thr) | field host p95 (ms, 30 dev at 1 Hz) | ratio |"
    lines = [header, "|---|---|---|---|---|"]
    for r in rows:
        field_over_quiet = r["field_host_p95_ms"] / r["planner_host_p95_ms"]
        lines.append(f"| {r['model']} | {r['accuracy']:.3f} | {r['planner_host_p95_ms']:.3f} | "
                     f"{r['field_host_p95_ms']:.3f} | {field_over_quiet:.2f} |")  # fmt: skip
    field_of = {r["model"]: r["field_host_p95_ms"] for r in rows}
    full = field_of[rungs[0]]
    lines += [
        "",
        "Simulated field p95 = field host p95 x device/host for the model's path (x 2.5 on the planted slow devices),",
        "judged like the trigger and the gates: by the upper bound of its telemetry bucket against the budget;",
        "the margin is",
        "budget / p95 (within) or p95 / budget (over). The recompressed model is the rung the demo's builder",
        f"(`choose_rung`, fit margin {FIT_MARGIN:g}) picks at 2.5x from the full-width student's field p95.",
        "",
        (
            "| class | device/host (fp32) | budget (ms) | planner's pick | pick | full-width | full-width x2.5 | "
            "recompressed x2.5 |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    widths = [recipe_width(r) for r in LADDER]
    host_of_width = {w: width_latency_ms(w) for w in widths}
    chosen: dict[str, str] = {}
    for name in CLASSES:
        p = profiles[name]
        sf, budget = dev_over_host(name, rungs[0]), p.latency_budget_ms
        pick = field_of[picks[name]] * dev_over_host(name, picks[name])
        index, _ = choose_rung(
            base_p95_ms=full * sf, slowdown=SLOW, device_over_host=sf, current_host_ms=host_of_width[widths[0]],
            rung_host_ms=[host_of_width[w] for w in widths], budget_ms=budget,
        )  # fmt: skip
        chosen[name] = LADDER[index]["name"]
        rung = field_of[rungs[index]] * sf * SLOW
        lines.append(
            f"| {name} | {sf:.3g} | {budget:g} | {picks[name].split(': ', 1)[1]} | {_judge(pick, budget)} | "
            f"{_judge(full * sf, budget)} | {_judge(full * sf * SLOW, budget)} | {chosen[name]}: "
            f"{_judge(rung, budget)} |"
        )
    lines += [
        "",
        "The speed-factor trigger (controller/recompress/policy.py) observes the field p95's bucket bound / the",
        "planner's predicted p95, and fires when that is off 1 by more than the tolerance (rpi4.toml). For the",
        "planner's picks and the full-width student (the demo's first rpi4 model), at the profiled speed and 2.5x",
        "slower:",
        "",
        "| class | model | predicted p95 (ms) | field p95 (ms) | bucket bound (ms) | field / predicted | x2.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    observed: dict[str, float] = {}
    for name in CLASSES:
        for label in (picks[name], rungs[0]):
            sf = dev_over_host(name, label)
            want = predicted.get(label, models[label][1] * sf)
            got = field_of[label] * sf
            ratio, slow = _bound(got) / want, _bound(got * SLOW) / want
            observed[f"{name}: {label}"] = ratio
            lines.append(f"| {name} | {label.split(': ', 1)[-1]} | {want:.3f} | {got:.3f} | {_bound(got):g} | "
                         f"{ratio:.2f} | {slow:.2f} |")  # fmt: skip
    summary = {
        "rows": rows,
        "picks": picks,
        "chosen_rung": chosen,
        "field_over_predicted": observed,
        "host": host_ref.model_dump(),
    }
    (args.out / "calibration.json").write_text(json.dumps(summary, indent=2))
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("recompress-calibration", "Closed-loop calibration: planner vs simulated field latency", body)


if __name__ == "__main__":
    main()
