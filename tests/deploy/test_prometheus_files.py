"""deploy/prometheus/: promtool accepts the configs and the rules, and every alert is unit-tested."""

from __future__ import annotations

import re
import subprocess

import yaml

from .conftest import PROMETHEUS_DIR, fast_rules, require

RULES = PROMETHEUS_DIR / "alerts.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, timeout=120,
                          cwd=PROMETHEUS_DIR)


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_config_accepts_the_compose_and_kubernetes_configs():
    for name in ("prometheus.yml", "prometheus-k8s.yml"):
        result = promtool("check", "config", name)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass():
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_issue_s_alerts_exist_each_with_a_runbook_line_and_a_severity():
    names = {a["alert"] for a in alerts()}
    assert names >= {"StreamfilterConsumerLagGrowing", "StreamfilterNoProgress", "StreamfilterDLQRateHigh",
                     "StreamfilterAcceptRateDrift", "StreamfilterSnapshotStale", "StreamfilterTransactionsAborting",
                     "StreamfilterScrapeDown"}
    for alert in alerts():
        runbook = alert["annotations"].get("runbook", "")
        assert runbook and "\n" not in runbook.strip(), f"{alert['alert']}: one runbook line"
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test_case():
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names <= fires, f"alerts never shown to fire: {names - fires}"
    assert names <= quiet, f"alerts never shown to stay quiet: {names - quiet}"


def test_fast_rules_only_shorten_durations(tmp_path):
    fast = fast_rules(RULES.read_text())
    assert not re.search(r"\[\d+m\]|for: \d+m", fast)
    original, shortened = alerts(), [r for g in yaml.safe_load(fast)["groups"] for r in g["rules"]]
    for a, b in zip(original, shortened):
        assert re.sub(r"\[\d+[smh]\]", "[w]", a["expr"]) == re.sub(r"\[\d+[smh]\]", "[w]", b["expr"])
        assert (a["labels"], a["annotations"]) == (b["labels"], b["annotations"])
    (tmp_path / "alerts.yml").write_text(fast)
    result = subprocess.run([require("promtool"), "check", "rules", str(tmp_path / "alerts.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
