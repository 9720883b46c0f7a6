"""A real Prometheus (Debian's `prometheus` binary) for the deployment tests.

`Prometheus` starts the server on a free loopback port with its own config and data folder
under the test's temporary directory, scraping every second, and is always stopped. Queries
go through Prometheus' HTTP API, as Grafana's would.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from streamfilter.broker import free_port

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "grafana" / "dashboards" / "streamfilter.json"
SCRAPE_INTERVAL_S = 1


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (Debian package prometheus; `make test` installs it)")
    return path


def fast_rules(text: str, window: str = "10s", hold: str = "5s") -> str:
    """alerts.yml with every range window and `for:` shortened, for live firing in seconds.

    Only durations change: the expressions, thresholds and labels stay those of the real rules.
    """
    text = re.sub(r"\[\d+[smh]\]", f"[{window}]", text)
    return re.sub(r"(\n\s+for: )\d+[smh]", rf"\g<1>{hold}", text)


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], rules: str | None = None):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rule_files = ""
        if rules is not None:
            (workdir / "alerts.yml").write_text(rules)
            rule_files = "rule_files: [alerts.yml]\n"
        (workdir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n{rule_files}"
            "scrape_configs:\n  - job_name: streamfilter\n"
            f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Prometheus":
        log = open(self.workdir / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [require("prometheus"), f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.log()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus did not become ready: {self.log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def fired(self, alertname: str, start: float, end: float) -> list[dict]:
        """Label sets of `alertname` that were firing at some point in [start, end]."""
        series = self.query_range(f'ALERTS{{alertname="{alertname}", alertstate="firing"}}', start, end)
        return [s["metric"] for s in series]

    def wait_firing(self, alertname: str, timeout_s: float, **labels: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for alert in self.api("alerts")["alerts"]:
                if (alert["labels"]["alertname"] == alertname and alert["state"] == "firing"
                        and all(alert["labels"].get(k) == v for k, v in labels.items())):
                    return alert
            time.sleep(0.5)
        states = [(a["labels"], a["state"]) for a in self.api("alerts")["alerts"]]
        raise AssertionError(f"{alertname} {labels} did not fire within {timeout_s:.0f}s; alerts now: {states}")


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) for every query of every panel, rows included."""
    dashboard = json.loads(path.read_text())
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel["title"], target["refId"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return out


def as_grafana_sends(expr: str, scrape_interval_s: float, step_s: float) -> str:
    """Substitute what Grafana substitutes before sending a query to Prometheus.

    `$job` with the variable's "All" value (`.+`); `$__rate_interval` with Grafana's
    max(step + scrape interval, 4 x scrape interval), the scrape interval being the
    datasource's `timeInterval`.
    """
    rate_interval = max(step_s + scrape_interval_s, 4 * scrape_interval_s)
    return expr.replace("$job", ".+").replace("$__rate_interval", f"{rate_interval:g}s")
