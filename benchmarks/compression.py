"""Compression benchmark: every technique alone, onnxruntime's static int8 alone, and the full chain, side by side.

    .venv/bin/python benchmarks/compression.py [--runs 1000] [--no-write] [--skip-vibration]

Trains the digits example (and the vibration example), exports fp32, then measures in one process with one function
(`edgefleet.compression.measure`): accuracy on held-out data, file and zstd transfer bytes, onnxruntime latency
p50/p95 at batch 1 on one thread (ratios against fp32 in the same run) and the peak RSS of a fresh onnxruntime process.
"The baseline a user would pick" is onnxruntime's `quantize_static` with its defaults (per-tensor weights, uint8
activations, MinMax). Targets on digits: the full chain >= 10x smaller than fp32, <= 1 point accuracy loss, faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _report import write_section

from edgefleet.compression import (
    ActivationPruneConfig,
    DistillConfig,
    FactorizeConfig,
    Fp16Config,
    MagnitudePruneConfig,
    Measurement,
    PassContext,
    QatConfig,
    QuantizeDynamicConfig,
    QuantizeStaticConfig,
    Recipe,
    StructuredPruneConfig,
    Task,
    apply_steps,
    initial_state,
    load_recipe,
    measure,
)
from edgefleet.compression.examples import EXAMPLE_RECIPE, train_example
from edgefleet.compression.export import compact_names
from edgefleet.compression.measure import with_ratios
from edgefleet.compression.registry import ModelState


@dataclass(frozen=True)
class Row:
    name: str
    m: Measurement
    seconds: float


def _techniques() -> list[tuple[str, Recipe]]:
    one = [
        ("ORT static int8 alone (defaults)", QuantizeStaticConfig(per_channel=False, reduce_range=False)),
        ("static int8 (per-channel, 7-bit)", QuantizeStaticConfig()),
        ("dynamic int8", QuantizeDynamicConfig()),
        ("fp16 weights", Fp16Config()),
        ("QAT int8 (3 epochs)", QatConfig(epochs=3)),
        ("magnitude prune 60% (global)", MagnitudePruneConfig(amount=0.6)),
        ("structured prune 50%", StructuredPruneConfig(amount=0.5)),
        ("activation prune 50% (APoZ)", ActivationPruneConfig(amount=0.5)),
        ("distill to width 0.5", DistillConfig(width=0.5, epochs=15)),
        ("factorize (90% energy)", FactorizeConfig(energy=0.9)),
    ]
    return [(name, Recipe(name=name, passes=[config])) for name, config in one]


def _run(name: str, recipe: Recipe, state: ModelState, task: Task, *, base: Measurement, runs: int) -> Row:
    began = time.monotonic()
    final = state
    for _, final in apply_steps(state, recipe, task, ctx=PassContext(teacher=state.module)):  # noqa: B007
        pass
    seconds = time.monotonic() - began
    result = measure(compact_names(final.onnx), task, runs=runs, warmup=50, baseline=base)
    print(
        f"  {name}: {result.accuracy:.4f} acc, {result.file_bytes} B, p50 x{result.latency_p50_ratio:.2f}", flush=True
    )
    return Row(name, result, seconds)


def _table(rows: list[Row]) -> str:
    head = (
        "| model | accuracy | bytes | transfer bytes (zstd) | size ratio | p50 ms | p95 ms | p50 vs fp32 | p95 vs fp32 "
        "| peak RSS MB | compress s |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        m = row.m
        lines.append(
            f"| {row.name} | {m.accuracy:.4f} | {m.file_bytes:,} | {m.transfer_bytes:,} | {m.size_ratio or 1:.1f}x "
            f"| {m.latency_p50_ms:.3f} | {m.latency_p95_ms:.3f} | {m.latency_p50_ratio or 1:.2f} "
            f"| {m.latency_p95_ratio or 1:.2f} | {(m.peak_rss_bytes or 0) / 2**20:.1f} | {row.seconds:.0f} |"
        )
    return "\n".join(lines)


def bench(example: str, recipes: list[tuple[str, Recipe]], runs: int) -> list[Row]:
    print(f"{example}: training", flush=True)
    began = time.monotonic()
    model, task = train_example(example)
    state = initial_state(model, task)
    trained = time.monotonic() - began
    base = measure(compact_names(state.onnx), task, runs=runs, warmup=50)
    rows = [Row("fp32 (trained model)", with_ratios(base, base), trained)]
    rows.extend(_run(name, recipe, state, task, base=base, runs=runs) for name, recipe in recipes)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="latency runs per model (after 50 warm-up runs)")
    parser.add_argument("--no-write", action="store_true", help="print the table only, leave docs/benchmarks.md")
    parser.add_argument("--skip-vibration", action="store_true")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads for training (on shared cores 1 beats 2 by far)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    chain = load_recipe(EXAMPLE_RECIPE)
    digits = bench("digits", [*_techniques(), ("full chain: distill -> prune -> factorize -> int8", chain)], args.runs)
    body = ["### digits (load_digits, 16x16, residual CNN)", "", _table(digits)]
    full = digits[-1].m
    verdict = (
        f"Targets (digits, full chain): >= 10x smaller: {full.size_ratio:.1f}x "
        f"{'met' if (full.size_ratio or 0) >= 10 else 'NOT met'}; <= 1 point accuracy loss: "
        f"{(full.accuracy_delta or 0) * 100:+.2f} pt {'met' if (full.accuracy_delta or 0) >= -0.01 else 'NOT met'}; "
        f"faster than fp32: p50 x{full.latency_p50_ratio:.2f} "
        f"{'met' if (full.latency_p50_ratio or 2) < 1 else 'NOT met'}."
    )
    body += ["", verdict]
    if not args.skip_vibration:
        short = [_techniques()[0], ("full chain (same recipe)", chain)]
        vibration = bench("vibration", short, args.runs)
        body += ["", "### vibration (generated signals, 1-D CNN)", "", _table(vibration)]
    body += [
        "",
        (
            "Ratios compare against the fp32 export measured in the same run (batch 1, one onnxruntime thread, "
            f"{args.runs} runs after 50 warm-up). Each technique runs alone on the trained model with its default "
            "recovery fine-tune; the full chain is `compression/examples/full-chain.toml`. Peak RSS is a fresh "
            "process with onnxruntime and the model (no torch); most of it is onnxruntime itself."
        ),
    ]
    load = os.getloadavg()
    body.append(
        f"\nLoad average when the run ended: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on "
        f"{os.cpu_count()} CPUs shared with other jobs: p95 is the number most disturbed by that; read p50 first."
    )
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("compression", "Compression: techniques alone, onnxruntime int8 alone, the full chain", text)


if __name__ == "__main__":
    main()
