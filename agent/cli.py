"""The device's command line, `edgefleet-agent`: run the agent, simulate a fleet, measure this device.

argparse rather than typer: the agent install carries nothing beyond paho-mqtt, onnxruntime, numpy,
pydantic and cryptography.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="Run compressed models on this device; download, verify, activate, report, roll back.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.add_parser("run", help="run the agent on this device")
    sub.add_parser("simulate", help="run many simulated devices in one process")
    sub.add_parser("speed-factor", help="measure how much slower this device runs a model than the host")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    print(f"edgefleet-agent {args.verb}: not implemented yet", file=sys.stderr)  # noqa: T201
    return 1


if __name__ == "__main__":
    sys.exit(main())
