"""Write (or check) one JSON Schema file per wire message into a folder: `python -m edgefleet.protocols.schemas DIR`.

The files are deterministic (sorted keys, two-space indent, trailing newline), so `--check` can tell when the
committed docs/schemas/ no longer match the models: it exits 1 and names the stale files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from edgefleet.protocols.blocks import BlockRequest
from edgefleet.protocols.commands import Command
from edgefleet.protocols.manifest import Manifest, SignedManifest
from edgefleet.protocols.messages import Birth, JobEvent, Status
from edgefleet.protocols.telemetry import TelemetryBatch

__all__ = ["SCHEMA_FILES", "check_schemas", "render_schemas", "write_schemas"]

_SOURCES: dict[str, Any] = {
    "birth.json": Birth,
    "status.json": Status,
    "telemetry.json": TelemetryBatch,
    "job-event.json": JobEvent,
    "command.json": Command,
    "block-request.json": BlockRequest,
    "manifest.json": Manifest,
    "signed-manifest.json": SignedManifest,
}
SCHEMA_FILES: tuple[str, ...] = tuple(sorted(_SOURCES))


def render_schemas() -> dict[str, str]:
    """File name → JSON Schema text, for every wire message."""
    rendered: dict[str, str] = {}
    for name, source in _SOURCES.items():
        schema = TypeAdapter(source).json_schema(by_alias=True)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema.setdefault("title", name.removesuffix(".json"))
        rendered[name] = json.dumps(schema, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    return rendered


def write_schemas(directory: Path) -> list[str]:
    """Write every schema file into `directory`; return the names of the files that changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in render_schemas().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(name)
    return changed


def check_schemas(directory: Path) -> list[str]:
    """The names of the schema files in `directory` that are missing or differ from the models."""
    stale = []
    for name, text in render_schemas().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the schemas into DIR, or with --check report stale ones and exit 1."""
    parser = argparse.ArgumentParser(prog="python -m edgefleet.protocols.schemas", description=__doc__)
    parser.add_argument("directory", type=Path, help="folder for the schema files, e.g. docs/schemas")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = check_schemas(args.directory)
        if stale:
            sys.stderr.write(f"stale JSON schemas in {args.directory}: {', '.join(stale)}; run `make schemas`\n")
            return 1
        return 0
    for name in write_schemas(args.directory):
        sys.stdout.write(f"wrote {args.directory / name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
