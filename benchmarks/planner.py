"""Benchmark: the planner's pick versus onnxruntime static int8 alone versus fp32, on every shipped profile.

For each shipped example (digits, vibration) and each profile in deploy/profiles: plan with a fresh cache (so the
planning time is a cold one), then judge static int8 alone (`QuantizeStaticConfig()` defaults: what a user would
pick instead) and the fp32 export the same way. Writes the table into docs/benchmarks.md (section "planner").

    .venv/bin/python benchmarks/planner.py [--examples digits,vibration] [--profiles deploy/profiles]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section

from edgefleet.compression import QuantizeStaticConfig, Recipe
from edgefleet.compression.examples import train_example
from edgefleet.compression.host_speed import host_reference
from edgefleet.compression.plan_cache import PlanCache
from edgefleet.compression.plan_models import Candidate, PlanResult
from edgefleet.compression.planner import judge_recipe, plan
from edgefleet.protocols.profile import DeviceProfile, load_profile

ROOT = Path(__file__).resolve().parent.parent


def row(example: str, profile: str, variant: str, c: Candidate | None, extra: str = "") -> str:
    if c is None:
        return f"| {example} | {profile} | {variant} | (failed) | | | | | {extra} |"
    m = c.measurement
    missed = ", ".join(k.constraint.value for k in c.checks if not k.fits) or ("incompatible" if c.incompatible else "")
    fits = "yes" if c.fits else f"no ({missed})"
    return (
        f"| {example} | {profile} | {variant} | {c.label} | {m.accuracy:.4f} | {m.file_bytes} | "
        f"{c.predicted_latency_ms:.2f} | {fits} | {extra} |"
    )


def judge_targets(result: PlanResult, int8: Candidate | None) -> list[str]:
    problems = []
    pick = result.chosen
    if pick is None:
        return [f"{result.task}/{result.profile.name}: nothing fits"]
    if int8 is not None and int8.fits:
        pm, im = pick.measurement, int8.measurement
        if pm.accuracy < im.accuracy:
            problems.append(f"{result.task}/{result.profile.name}: pick less accurate than int8 alone")
        if pm.file_bytes > im.file_bytes:
            problems.append(f"{result.task}/{result.profile.name}: pick larger than int8 alone")
        if pick.predicted_latency_ms > int8.predicted_latency_ms:
            problems.append(f"{result.task}/{result.profile.name}: pick slower than int8 alone")
    return problems


def bench_example(example: str, profiles: list[DeviceProfile], lines: list[str], problems: list[str]) -> None:
    began = time.monotonic()
    model, task = train_example(example)
    print(f"{example}: trained in {time.monotonic() - began:.0f} s", flush=True)
    for profile in profiles:
        with tempfile.TemporaryDirectory(prefix="edgefleet-plan-bench-") as tmp:
            began = time.monotonic()
            result = plan(model, task, profile, cache=PlanCache(tmp))
            seconds = time.monotonic() - began
            # The same cache: int8 alone and fp32 are the very artifacts (and measurements) the planner saw.
            int8_recipe = Recipe(name="int8", passes=[QuantizeStaticConfig()])
            fp32, int8 = judge_recipe(model, task, profile, int8_recipe, cache=PlanCache(tmp))
        binding = result.binding.value if result.binding else "none"
        timing = f"planned in {seconds:.0f} s, {len(result.candidates)} candidates, binding: {binding}"
        lines.append(row(example, profile.name, "**planner pick**", result.chosen or result.closest, timing))
        lines.append(row(example, profile.name, "static int8 alone", int8))
        lines.append(row(example, profile.name, "fp32", fp32))
        problems.extend(judge_targets(result, int8))
        print(lines[-3], lines[-2], lines[-1], sep="\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="digits,vibration")
    parser.add_argument("--profiles", type=Path, default=ROOT / "deploy" / "profiles")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads for training (1: the host is shared and busy)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    profiles = [load_profile(p) for p in sorted(args.profiles.glob("*.toml"))]
    lines = [
        "| example | profile | variant | recipe | accuracy | bytes | predicted device p95 ms | fits | planning |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    problems: list[str] = []
    for example in args.examples.split(","):
        bench_example(example, profiles, lines, problems)
    verdict = "All targets met." if not problems else "Targets missed: " + "; ".join(problems) + "."
    body = (
        f"Fine-tuning with {torch.get_num_threads()} torch thread(s); load average while it ran: "
        f"{os.getloadavg()[0]:.1f} (other jobs share this 2-core machine). "
        "Each profile planned with a cold cache (`plan(model, task, profile)`, default `PlanOptions`: rungs of 1 and 3 "
        "fine-tune epochs, eta 3, 95% confidence on accuracy); static int8 alone and fp32 judged the same way. "
        "Predicted device p95 = host p95 at 1 thread x device/host on the reference workload for the candidate's "
        f"path (fp32 or int8; this host's reference at 1 thread: {host_reference()}). Accuracy is on the held-out "
        "split; training time of the examples is not included.\n\n" + "\n".join(lines) + f"\n\n{verdict}\n"
    )
    print(verdict)
    if not args.no_write:
        write_section("planner", "Planner: pick vs static int8 alone vs fp32 per device profile", body)


if __name__ == "__main__":
    main()
