"""`make bench`: run every benchmark, one after another, each in a process of its own, and say which failed.

Each benchmark writes its own section of docs/benchmarks.md; this only runs them in a fixed order (the cheap ones
first) and stops nothing on a failure, so one broken benchmark does not hide the others' numbers.

    .venv/bin/python benchmarks/run_all.py [--only transfer,simulator] [--list]

Arguments after `--` go to every benchmark run (e.g. `-- --no-write` to print the tables only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Cheap first; the planner benchmark plans every profile x example from a cold cache (minutes).
ORDER = ("compression", "telemetry_ingest", "transfer", "simulator", "speed_model", "recompress_calibration", "planner")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, extra = args[:cut], args[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    options = parser.parse_args(args)
    if options.list:
        print("\n".join(ORDER))
        return 0
    chosen = [n.strip() for n in options.only.split(",") if n.strip()] or list(ORDER)
    unknown = [n for n in chosen if n not in ORDER]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    failed: list[str] = []
    for name in chosen:
        began = time.monotonic()
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *extra])
        print(f"== {name}: exit {code} after {time.monotonic() - began:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
