"""The result table of `make check-arm64`: the arm64 and x86 checks of one bundle side by side, on stdout and in
docs/benchmarks.md (section `arm64`, through the benchmarks' own section writer).

    .venv/bin/python deploy/arm64/report.py build/arm64/bundle --cpu cortex-a72 --write-doc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TITLE = "The agent on arm64 (Debian arm64 under qemu-user, `make check-arm64`)"


def _load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _verdict(result: dict[str, Any] | None) -> str:
    if result is None:
        return "(not run)"
    verdict = str(result.get("verdict", "error"))
    detail = str(result.get("detail", ""))
    if verdict == "failed":
        return f"failed: {detail.split(' on ', 1)[0]}"
    if verdict == "rejected":
        return f"rejected ({result.get('stage')}): {detail.split(':', 1)[0]}"
    if verdict == "error":
        return f"error: {detail}"
    return verdict


def _number(result: dict[str, Any] | None, key: str, fmt: str) -> str:
    value = None if result is None else result.get(key)
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _tolerance(bundle: Path, name: str) -> str:
    try:
        tol = _load(bundle / "artifacts" / name / "manifest.json")["manifest"]["tolerances"]
    except (OSError, KeyError, ValueError):
        return "-"
    return f"{tol['abs_tol']:.3g} / {tol['rel_tol']:.3g} / {tol['top1_agreement']:g}"


_HEADER = (
    "artifact",
    "precision",
    "bytes",
    "tolerance (abs / rel / top-1)",
    "expected",
    "verdict on arm64",
    "agreement",
    "close",
    "p95 ms arm64 (qemu)",
    "p95 ms x86",
    "peak RSS MB arm64 (qemu)",
    "verdict on x86",
)
_ALIGN = ("---", "---", "---:", "---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---")


def _row(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(bundle: Path, arm: dict[str, Any], x86: dict[str, Any] | None) -> str:
    """The markdown table, one row per artifact."""
    native = {r["name"]: r for r in (x86 or {}).get("results", [])}
    rows = [_row(_HEADER), "|" + "|".join(_ALIGN) + "|"]
    for r in arm["results"]:
        other = native.get(r["name"])
        cells = [
            r["name"],
            r["precision"],
            f"{r['bytes']:,}",
            _tolerance(bundle, r["name"]),
            r["expect"],
            _verdict(r),
            _number(r, "agreement", ".3f"),
            _number(r, "close", ".3f"),
            _number(r, "p95_ms", ".2f"),
            _number(other, "p95_ms", ".3f"),
            _number(r, "peak_rss_mb", ".0f"),
            _verdict(other),
        ]
        rows.append(_row(cells))
    return "\n".join(rows)


def body(bundle: Path, arm: dict[str, Any], x86: dict[str, Any] | None, *, cpu: str, qemu: str, rootfs: str) -> str:
    """The section: what ran where, the table, how to read it."""
    index = _load(bundle / "index.json")
    base, xbase = arm.get("baseline", {}), (x86 or {}).get("baseline", {})
    total = len(arm["results"])
    right = sum(bool(r["as_expected"]) for r in arm["results"])
    setup = (
        f"{rootfs}, `{qemu}` emulating a {cpu} (`QEMU_CPU`; the Raspberry Pi 4's core, without int8 dot product). "
        f"In the chroot `pip install '.[agent]'` installed Python {arm.get('python')}'s agent with onnxruntime "
        f"{base.get('onnxruntime')} (its aarch64 wheel from PyPI) and numpy {base.get('numpy')}, no torch. The "
        f"artifacts were made on x86 (onnxruntime {xbase.get('onnxruntime', '?')}) by "
        "`deploy/arm64/make_artifacts.py` through the controller's catalog: the digits CNN "
        f"({index['fp32_accuracy']:.2%} on its validation split), signed for class `{index['device_class']}` with "
        "16 validation samples each."
    )
    how = (
        f"Verdicts as expected on arm64: {right}/{total}. Each artifact is checked in a fresh process by "
        "`deploy/arm64/check_artifacts.py` with the agent's own code: `verify_signed` with the trusted public key, "
        "a `Download` fed block by block and `verify_download` (sha256), `install_into_slot`, then `validate_model` "
        f"on a `ModelRunner` ({arm.get('threads')} thread). `other-model-samples` and `swapped-labels` carry the "
        "fp32 model's samples; the `tampered-*` ones were changed after signing."
    )
    caveats = (
        "The latency budget is not applied under emulation (`latency_budget_ms=None`): qemu translates every "
        "instruction, so its p95 says nothing about a real Cortex-A72 and only ranks the artifacts. Peak RSS is "
        "`ru_maxrss` of the agent process, which under qemu-user includes the emulator and its translated-code "
        "cache; an agent process that has only imported numpy, onnxruntime and the agent peaks at "
        f"{_number(base, 'peak_rss_mb', '.0f')} MB there ({_number(xbase, 'peak_rss_mb', '.0f')} MB natively "
        "on x86)."
    )
    parts = [setup, table(bundle, arm, x86), how, caveats]
    speed_path = bundle / "arm64-speed.json"
    if speed_path.exists():
        speed = json.loads(speed_path.read_text())
        times = ", ".join(f"{k} {v:g}" for k, v in speed["reference_ms"].items())
        parts.append(
            "The reference workload a device's speed is measured on (`edgefleet-agent speed-factor --threads 1`, "
            f"from the installed wheel) runs there too: {times} ms under emulation (fp32 and int8 paths; as with "
            "the p95 above, emulated times only show that the models load and run on arm64's kernels)."
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--cpu", default="cortex-a72", help="the CPU qemu emulated")
    parser.add_argument("--qemu", default="qemu-aarch64", help="qemu's version line")
    parser.add_argument("--rootfs", default="Debian arm64", help="what the root file system is")
    parser.add_argument("--write-doc", action="store_true", help="replace the `arm64` section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    arm = _load(args.bundle / "arm64.json")
    x86_path = args.bundle / "x86.json"
    x86 = _load(x86_path) if x86_path.exists() else None
    text = body(args.bundle, arm, x86, cpu=args.cpu, qemu=args.qemu, rootfs=args.rootfs)
    sys.stdout.write(f"\n{text}\n\n")
    if args.write_doc:
        # benchmarks/ is a folder of scripts, not a package: its section writer is imported from there.
        sys.path.insert(0, str(REPO / "benchmarks"))
        from _report import write_section  # type: ignore[import-not-found]

        write_section("arm64", TITLE, text)
    return 1 if arm.get("mismatches") or (x86 or {}).get("mismatches") else 0


if __name__ == "__main__":
    raise SystemExit(main())
