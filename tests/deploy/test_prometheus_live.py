"""Every PromQL expression of the rules and dashboards, run by a real Prometheus scraping a real controller.

A scripted fleet (births, telemetry with latencies, labels and errors, one garbage batch in five, a block request,
a deploy job, a recompression proposal waiting for approval, a gated rollout whose canary breaches its gates, then 4
of 5 gateways going offline) feeds a `ControllerApp` over a real broker; Prometheus scrapes it every second, with a
second target that is down (a dead replica), and evaluates the shipped rules every second. Each expression must
return at least one finite sample, so the triggered alerts (rollout paused by a gate, class over its latency budget,
recompression pending, devices offline en masse, telemetry rejects rising, controller down) must fire their
conditions. Expressions that need a metric of the contract not exported yet (deploykit.PENDING_METRICS) are
skipped, naming the metric and why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deploykit import PENDING_METRICS, RULES, Expression, all_expressions, listen_port, metrics_needed, tool
from livekit import PrometheusProcess, ScriptedFleet, wait_for

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

EXPRESSIONS = all_expressions()
DATA_WITHIN_S = 40.0


@dataclass
class Live:
    prometheus: PrometheusProcess
    fleet: ScriptedFleet
    deadline: float

    def exported(self, metric: str) -> bool:
        return bool(self.prometheus.query(f"count({metric})"))


@pytest.fixture(scope="module")
def live(mqtt_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    binary = tool("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is missing: install Debian's `prometheus` package (make services does)")
    workdir: Path = tmp_path_factory.mktemp("live")
    fleet = ScriptedFleet(workdir, mqtt_broker.host, mqtt_broker.port)
    prometheus: PrometheusProcess | None = None
    try:
        fleet.register()
        target = fleet.start()
        fleet.births()
        fleet.start_streaming()
        fleet.propose_recompression(timeout=15)
        fleet.start_rollout()
        dead_replica = f"127.0.0.1:{listen_port()}"
        prometheus = PrometheusProcess(binary, workdir / "prometheus", rules=RULES, targets=[target, dead_replica])
        prometheus.start()
        online = 'edgefleet_class:devices_online:count{device_class="x86-gateway"} == 5'
        assert wait_for(lambda: bool(prometheus.query(online)), timeout=20), "the gateways never showed as online"
        time.sleep(2)  # a few evaluations with every gateway online, then most of them drop
        fleet.drop_gateways()
        yield Live(prometheus, fleet, time.monotonic() + DATA_WITHIN_S)
    finally:
        if prometheus is not None:
            prometheus.stop()
        fleet.stop()


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.mark.parametrize("expression", EXPRESSIONS, ids=[e.where for e in EXPRESSIONS])
def test_expression_returns_data(live: Live, expression: Expression) -> None:
    pending = sorted(m for m in metrics_needed(expression.expr) if m in PENDING_METRICS and not live.exported(m))
    result = live.prometheus.query(expression.expr)  # a PromQL error fails here, pending or not
    if pending and not finite(result):
        reasons = "; ".join(f"{m}: {PENDING_METRICS[m]}" for m in pending)
        pytest.skip(f"needs metrics of the contract not exported yet ({reasons})")
    while not finite(result) and time.monotonic() < live.deadline:
        time.sleep(0.5)
        result = live.prometheus.query(expression.expr)
    assert finite(result), f"{expression.where}: {expression.expr!r} returned no finite sample: {result}"


def test_the_rollout_paused_on_its_gates(live: Live) -> None:
    """What `edgefleet rollout status` shows for the scripted rollout: its canary breached, so it paused."""
    assert wait_for(lambda: live.fleet.rollout_state() == "paused", timeout=max(1.0, live.deadline - time.monotonic()))


def test_the_scrape_carries_no_device_ids(live: Live) -> None:
    """Labels stay bounded (DESIGN.md): no series names a device."""
    series = live.prometheus.query('{__name__=~"edgefleet_.+"}')
    assert series
    devices = {"pi-1", "pi-2", "pi-3", "gw-1", "gw-2", "gw-3", "gw-4", "gw-5"}
    leaked = [s["metric"] for s in series if devices & set(s["metric"].values())]
    assert leaked == []
