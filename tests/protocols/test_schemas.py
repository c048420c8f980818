"""docs/schemas/ must match the models, and the schema CLI must say so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgefleet.protocols.schemas import SCHEMA_FILES, check_schemas, main, render_schemas, write_schemas

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_docs_schemas_are_current() -> None:
    stale = check_schemas(DOCS / "schemas")
    assert not stale, f"docs/schemas is stale ({', '.join(stale)}): run `make schemas`"


def test_schemas_are_deterministic_and_use_wire_names() -> None:
    first, second = render_schemas(), render_schemas()
    assert first == second
    assert sorted(first) == list(SCHEMA_FILES)
    birth = json.loads(first["birth.json"])
    assert "schema" in birth["properties"]
    assert "schema_version" not in birth["properties"]
    assert birth["additionalProperties"] is False
    command = json.loads(first["command.json"])
    assert command["discriminator"]["propertyName"] == "type"


def test_check_flags_a_stale_folder(tmp_path: Path) -> None:
    assert main([str(tmp_path)]) == 0
    assert check_schemas(tmp_path) == []
    assert main([str(tmp_path), "--check"]) == 0
    (tmp_path / "birth.json").write_text("{}\n", encoding="utf-8")
    assert check_schemas(tmp_path) == ["birth.json"]
    assert main([str(tmp_path), "--check"]) == 1
    assert write_schemas(tmp_path) == ["birth.json"]


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.protocols.schemas", str(tmp_path / "out"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "make schemas" in result.stderr
