"""grafana/: the dashboard's structure, its queries against the package's metrics, the provisioning."""

from __future__ import annotations

import json
import re

import yaml

from streamfilter import metrics

from .conftest import DASHBOARD, REPO, dashboard_queries

PROVISIONING = REPO / "grafana" / "provisioning"


def exported_names() -> set[str]:
    return {sample.name for family in metrics.REGISTRY.collect() for sample in family.samples} | {
        family.name + suffix for family in metrics.REGISTRY.collect() for suffix in ("", "_total", "_bucket", "_sum",
                                                                                      "_count", "_info")}


def test_every_query_names_only_metrics_the_package_exports():
    names = exported_names()
    for title, ref, expr in dashboard_queries():
        for name in re.findall(r"\bstreamfilter_[a-z0-9_]+", expr):
            assert name in names, f"{title} [{ref}]: unknown metric {name}"


def test_the_issue_s_panels_are_there():
    titles = {title for title, _, _ in dashboard_queries()}
    for wanted in ("Documents in per stage", "Documents out per stage", "Accept rate per policy vs target",
                   "Ask-LLM score distribution", "Density score distribution", "Consumer lag per partition",
                   "Inference latency p50 / p99", "Batch size", "DLQ by reason", "Snapshot age", "Sketch documents",
                   "Transactions", "Broker connectivity"):
        assert wanted in titles


def test_panels_have_unique_ids_and_use_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    uid = datasources[0]["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "heatmap":
            assert all(t.get("format") == "heatmap" and "_bucket" in t["expr"] for t in panel["targets"])
    assert dashboard["templating"]["list"][0]["name"] == "job"


def test_dashboard_provider_points_where_compose_mounts_the_dashboards():
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "streamfilter.yml").read_text())["providers"][0]
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
