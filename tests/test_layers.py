"""The layer rules of DESIGN.md, checked where a user would notice them: in a fresh process."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "sqlmodel", "sqlalchemy", "prometheus_client", "typer")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120)
    return set(out.stdout.split())


def test_agent_and_protocols_do_not_import_torch_or_server_libraries() -> None:
    code = (
        "import importlib, pkgutil, edgefleet.agent, edgefleet.protocols\n"
        "for pkg in (edgefleet.agent, edgefleet.protocols):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
    )
    loaded = _modules_after(code)
    assert "edgefleet.agent.cli" in loaded
    assert not loaded & set(HEAVY), f"agent imports {sorted(loaded & set(HEAVY))}"


def test_operator_help_does_not_load_torch() -> None:
    code = (
        "from typer.testing import CliRunner\n"
        "from edgefleet.controller.cli.main import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
    )
    loaded = _modules_after(code)
    assert "torch" not in loaded


def test_console_scripts_answer_help() -> None:
    for script in ("edgefleet", "edgefleet-agent"):
        code = (
            "import sys\n"
            "from importlib.metadata import entry_points\n"
            f"entry = entry_points(group='console_scripts')['{script}']\n"
            f"sys.argv = ['{script}', '--help']\n"
            "entry.load()()\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert "usage" in out.stdout.lower()
