"""deploy/prometheus checked by promtool (config, rules, alert unit tests) and against the controller's metrics."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from deploykit import (
    OPERATIONS,
    PENDING_METRICS,
    PROMETHEUS_DIR,
    RULES,
    alert_rules,
    dashboard_expressions,
    metrics_needed,
    rule_expressions,
    tool,
)
from prometheus_client import CollectorRegistry
from sqlmodel import SQLModel

from edgefleet.controller.data.db import Database
from edgefleet.controller.rollout.metrics import RolloutCollector
from edgefleet.controller.service.metrics import ControllerMetrics
from edgefleet.protocols.telemetry import LATENCY_BUCKETS_SECONDS, TelemetryBatch

# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds"}
ISSUE_ALERTS = {
    "EdgefleetRolloutPausedByGate",
    "EdgefleetClassOverLatencyBudget",
    "EdgefleetDevicesOfflineEnMasse",
    "EdgefleetTelemetryRejectsRising",
    "EdgefleetRecompressionPendingApproval",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = tool("promtool")
    if found is None:
        pytest.skip("promtool is missing: install Debian's `prometheus` package (make services does)")
    return found


def run(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_config(promtool: str) -> None:
    result = run(promtool, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_alert_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_catches_a_broken_alert(promtool: str, tmp_path: Path) -> None:
    """The unit tests have teeth: a threshold loosened in rules.yml makes them fail."""
    rules = RULES.read_text(encoding="utf-8").replace("edgefleet:telemetry_rejected:ratio_rate5m > 0.05", "vector(1)")
    (tmp_path / "rules.yml").write_text(rules, encoding="utf-8")
    (tmp_path / "rules_test.yml").write_bytes((PROMETHEUS_DIR / "rules_test.yml").read_bytes())
    result = run(promtool, "test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "EdgefleetTelemetryRejectsRising" in result.stdout + result.stderr


def test_every_alert_of_the_issue_exists_with_summary_description_and_runbook() -> None:
    alerts = {rule["alert"]: rule for rule in alert_rules()}
    assert set(alerts) >= ISSUE_ALERTS
    operations = OPERATIONS.read_text(encoding="utf-8")
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", operations, re.MULTILINE)
    }
    for name, rule in alerts.items():
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        assert len(annotations.get("description", "")) > 40, name
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        page, _, anchor = annotations["runbook"].partition("#")
        assert page == "docs/operations.md", name
        assert anchor == name.lower(), name
        assert anchor in headings, f"docs/operations.md has no runbook heading for {name}"


def test_every_alert_is_unit_tested() -> None:
    tests = (PROMETHEUS_DIR / "rules_test.yml").read_text(encoding="utf-8")
    for rule in alert_rules():
        assert f"alertname: {rule['alert']}" in tests, rule["alert"]


def exported_names() -> set[str]:
    """Sample names a controller exports once every metric has a value (the families with no sample included)."""
    registry = CollectorRegistry()
    metrics = ControllerMetrics(
        registry=registry, device_states=lambda: {("rpi4", "online"): 1}, job_states=lambda: {("sent",): 1}
    )
    counts = (1,) + (0,) * len(LATENCY_BUCKETS_SECONDS)
    batch = TelemetryBatch.model_validate(
        {
            "session": "s",
            "seq": 0,
            "window_start": "2026-01-01T00:00:00Z",
            "window_end": "2026-01-01T00:00:10Z",
            "inference_count": 1,
            "latency_counts": counts,
            "latency_sum_seconds": 0.0001,
            "labelled_count": 1,
            "correct_count": 1,
            "mean_top1_confidence": 0.9,
            "errors": {"inference": 1},
        }
    )
    metrics.record_telemetry("rpi4", "m", 1, batch)
    metrics.accepted("telemetry")
    metrics.rejected("telemetry", "decode")
    metrics.bytes_served("rpi4", 10)
    metrics.commands.labels("deploy").inc()
    names = {sample.name for family in registry.collect() for sample in family.samples}
    # The rollout gauges are read from the registry database at scrape time: their families, even when empty.
    db = Database.open("sqlite://")
    try:
        SQLModel.metadata.create_all(db.engine)
        names |= {family.name for family in RolloutCollector(db).collect()}
    finally:
        db.dispose()
    return names


def test_every_metric_used_is_exported_or_part_of_the_contract() -> None:
    """A typo in a metric name would be a panel or alert that silently shows nothing."""
    exported = exported_names() | PROMETHEUS_SERIES
    used = set()
    for expression in rule_expressions() + dashboard_expressions():
        used |= metrics_needed(expression.expr)
    unknown = sorted(used - exported - set(PENDING_METRICS))
    assert unknown == []
    operations = OPERATIONS.read_text(encoding="utf-8")
    for metric in PENDING_METRICS:
        assert f"`{metric}" in operations, f"docs/operations.md does not define {metric}"


def test_the_compose_config_scrapes_the_controller_service() -> None:
    import yaml

    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs["edgefleet-controller"]["static_configs"][0]["targets"]
    assert targets == ["controller:9464"]
    assert config["rule_files"] == ["rules.yml"]
