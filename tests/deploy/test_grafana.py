"""The Grafana dashboards and provisioning, checked structurally (Grafana itself is not installed here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from deploykit import (
    DASHBOARDS,
    DATASOURCE_UID,
    DEPLOY,
    GRAFANA_VARIABLES,
    all_expressions,
    dashboard_expressions,
    grafana_to_promql,
    load_dashboards,
    panels,
)

PROVISIONING = DEPLOY / "grafana" / "provisioning"
EXPECTED = {"fleet-overview.json", "rollouts.json", "class-performance.json", "controller-health.json"}


def test_the_four_dashboards_exist_with_unique_uids_and_titles() -> None:
    boards = load_dashboards()
    assert set(boards) == EXPECTED
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    assert len({b["title"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        assert "edgefleet" in board["tags"], name
        assert board["panels"], name


def test_every_panel_queries_the_provisioned_datasource() -> None:
    for name, board in load_dashboards().items():
        for panel in panels(board):
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE_UID
                assert target["expr"].strip(), (name, panel["title"])
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] == DATASOURCE_UID


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    for name, board in load_dashboards().items():
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), name
        for panel in panels(board):
            pos = panel["gridPos"]
            assert pos["x"] >= 0, (name, panel["title"])
            assert pos["x"] + pos["w"] <= 24, (name, panel["title"])
            assert pos["h"] > 0, (name, panel["title"])


def test_only_known_variables_are_used() -> None:
    for name, board in load_dashboards().items():
        declared = {f"${v['name']}" for v in board["templating"]["list"]} | set(GRAFANA_VARIABLES)
        for panel in panels(board):
            for target in panel["targets"]:
                used = set(re.findall(r"\$\w+", target["expr"]))
                assert used <= declared, (name, panel["title"], used - declared)
                assert "$" not in grafana_to_promql(target["expr"]), (name, panel["title"])


def test_every_panel_query_is_among_the_expressions_the_live_test_runs() -> None:
    live = {e.expr for e in all_expressions()}
    for board in load_dashboards().values():
        for panel in panels(board):
            for target in panel["targets"]:
                assert grafana_to_promql(target["expr"]) in live, panel["title"]
    assert {e.expr for e in dashboard_expressions()} <= live


def test_the_heatmap_reads_the_histogram_buckets_by_le() -> None:
    board = load_dashboards()["class-performance.json"]
    heatmaps = [p for p in panels(board) if p["type"] == "heatmap"]
    assert len(heatmaps) == 1
    target = heatmaps[0]["targets"][0]
    assert target["format"] == "heatmap"
    assert "edgefleet_inference_latency_seconds_bucket" in target["expr"]
    assert "by (le)" in target["expr"]


def test_provisioning_points_at_the_dashboards_and_the_datasource_uid() -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    (source,) = sources["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "edgefleet.yml").read_text(encoding="utf-8"))
    (provider,) = providers["providers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert Path(DASHBOARDS).is_dir()
