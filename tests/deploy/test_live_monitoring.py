"""A real Prometheus scrapes a real `streamfilter run` that processes documents on the real broker.

One daemon and one Prometheus for the module (they take seconds to start), then, in order:
every dashboard query returns data; the scraped exposition passes `promtool check metrics`;
alerts fire when their condition is made true - the DLQ alert on malformed input, the
no-progress alert on an input blocked by an open upstream transaction, the scrape-down alert
on a stopped daemon - and the others stay quiet on a healthy run. Prometheus evaluates the
real alerts.yml with only its windows and `for:` durations shortened (`fast_rules`).
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from types import SimpleNamespace

import msgpack
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from kafka_helpers import produce, to_toml, wait_for
from streamfilter.broker import free_port

# tests/ is on sys.path (pytest's rootdir-relative packages): the daemon tests' helpers
from daemon.conftest import Daemon, malformed_values, sample_documents
from .conftest import (
    PROMETHEUS_DIR, SCRAPE_INTERVAL_S, Prometheus, as_grafana_sends, dashboard_queries, fast_rules, require,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

GOOD, BAD = 300, 40  # 12% malformed: above the DLQ alert's 5%


@pytest.fixture(scope="module")
def test_models():
    from streamfilter.models import ensure_test_models

    return ensure_test_models()


@pytest.fixture(scope="module")
def live(kafka_broker, test_models, tmp_path_factory):
    """Prometheus scraping a `streamfilter run` that has processed GOOD + BAD documents."""
    tmp = tmp_path_factory.mktemp("live")
    prefix = f"deploy-live-{int(time.time() * 1000) % 10**9}"
    topics = {k: f"{prefix}.{k}" for k in ("raw", "scored", "accepted", "rejected", "dlq")}
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    admin.create_topics([NewTopic(t, num_partitions=3, replication_factor=1) for t in topics.values()])
    admin.close()
    port = free_port()
    config = {
        "kafka": {"bootstrap_servers": kafka_broker, "instance_id": "live", "group_prefix": prefix,
                  "session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "transaction_timeout_ms": 10000},
        "topics": {**topics, "partitions": 3},
        "models": {"askllm": str(test_models.askllm), "embedder": str(test_models.sentence_t5),
                   "max_tokens": 128, "variant": "fp32", "inference_batch_docs": 32},
        "batch": {"max_batch_docs": 64, "max_wait_ms": 200},
        "sketch": {"rows": 100, "buckets": 2000, "snapshot_dir": str(tmp / "snapshots"), "snapshot_interval_s": 1.0},
        "policy": {"name": "askllm+density", "keep_rate": 0.3, "quality_keep": 0.6},
        "route": {"snapshot_poll_s": 1.0, "min_snapshot_docs": 1},
        "daemon": {"metrics_port": port, "shutdown_timeout_s": 20},
    }
    (tmp / "streamfilter.toml").write_text(to_toml(config))
    prometheus = Prometheus(tmp / "prometheus", [f"127.0.0.1:{port}"],
                            rules=fast_rules((PROMETHEUS_DIR / "alerts.yml").read_text()))
    daemon = Daemon(tmp / "streamfilter.toml", tmp / "daemon.log")
    try:
        prometheus.start()
        docs = sample_documents(GOOD, seed=11)
        values = [msgpack.packb(d) for d in docs] + malformed_values(BAD)
        values = [values[i] for i in sorted(range(len(values)), key=lambda i: (i * 7919) % len(values))]
        start = time.time()
        daemon.start("run")
        # In waves: every counter must rise across several scrapes, or rate() has nothing to
        # show on a fast machine that handles the whole sample between two scrapes.
        waves = 6
        for i in range(waves):
            produce(kafka_broker, topics["raw"], values[i::waves])
            time.sleep(2 * SCRAPE_INTERVAL_S)

        def handled(stage: str) -> float:
            result = prometheus.query(f'sum(streamfilter_documents_total{{stage="{stage}"}})')
            return float(result[0]["value"][1]) if result else 0.0

        wait_for(lambda: (handled("score") >= GOOD + BAD and handled("route") >= GOOD and handled("sketch") >= GOOD)
                 or not daemon.alive(), 240, interval_s=1, message="the daemon to handle every document")
        assert daemon.alive(), daemon.log()[-3000:]
        time.sleep(3 * SCRAPE_INTERVAL_S)  # the last increments scraped, and a few idle samples
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            exposition = response.read()
        yield SimpleNamespace(prometheus=prometheus, daemon=daemon, topics=topics, bootstrap=kafka_broker,
                              start=start, processed=time.time(), exposition=exposition, prefix=prefix)
    finally:
        if daemon.alive():
            daemon.proc.kill()
            daemon.proc.wait(30)
        prometheus.stop()


def test_every_dashboard_query_returns_data(live):
    missing = []
    for title, ref, expr in dashboard_queries():
        sent = as_grafana_sends(expr, scrape_interval_s=SCRAPE_INTERVAL_S, step_s=1)
        series = live.prometheus.query_range(sent, live.start, live.processed, step=1)
        values = [v for s in series for _, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
        if not values:
            missing.append(f"{title} [{ref}]: {sent}")
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)


def test_dashboard_job_variable_finds_the_daemon(live):
    jobs = {s["metric"]["job"] for s in live.prometheus.query("streamfilter_build_info")}
    assert jobs == {"streamfilter"}


def test_dashboard_numbers_match_what_the_daemon_did(live):
    """Spot checks that the panels show the truth, not just something."""
    p = live.prometheus
    scored = p.query('sum by (outcome) (streamfilter_documents_total{stage="score"})')
    assert {s["metric"]["outcome"]: float(s["value"][1]) for s in scored} == {"scored": GOOD, "dlq": BAD}
    assert float(p.query('sum(streamfilter_input_documents_total{stage="route"})')[0]["value"][1]) >= GOOD
    assert float(p.query("sum(streamfilter_sketch_documents)")[0]["value"][1]) == GOOD
    assert float(p.query("sum(streamfilter_dlq_documents_total)")[0]["value"][1]) == BAD
    # caught up: no lag left on any stage's partitions (transaction markers included)
    lags = p.query("streamfilter_consumer_lag_records")
    assert lags and all(float(s["value"][1]) == 0 for s in lags), lags


def test_scraped_metrics_pass_promtool_check_metrics(live):
    result = subprocess.run([require("promtool"), "check", "metrics"], input=live.exposition,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_healthy_run_fires_only_the_dlq_alert(live):
    p = live.prometheus
    assert {a["stage"] for a in p.fired("StreamfilterDLQRateHigh", live.start, time.time())} == {"score"}
    for name in ("StreamfilterScrapeDown", "StreamfilterNoProgress", "StreamfilterConsumerLagGrowing",
                 "StreamfilterTransactionsAborting", "StreamfilterBrokerDisconnected", "StreamfilterSnapshotStale",
                 "StreamfilterAcceptRateDrift", "StreamfilterRecordsQuarantined", "StreamfilterBatchRetriesHigh"):
        fired = p.fired(name, live.start, time.time())
        assert not fired, f"{name} fired on a healthy run:\n" + "\n".join(
            _what_the_stage_did(p, alert, live.start) for alert in fired)


def _what_the_stage_did(p, alert: dict, start: float) -> str:
    """A fired alert's stage, when it fired, and that stage's lag and handled count second by second
    (seconds since the daemon started): enough to tell a slow start from a stall."""
    stage = alert.get("stage", "")

    def timeline(expr: str) -> str:
        series = p.query_range(expr, start, time.time())
        return " ".join(f"{float(t) - start:.0f}s:{float(v):g}" for t, v in series[0]["values"]) if series else "none"

    where = 'stage="%s"' % stage
    firing = timeline('count(ALERTS{alertname="%s", alertstate="firing", %s})' % (alert["alertname"], where))
    lag = timeline("sum(streamfilter_consumer_lag_records{%s})" % where)
    handled = timeline("sum(streamfilter_documents_total{%s})" % where)
    return f"  stage {stage!r} firing at: {firing}\n    lag: {lag}\n    handled: {handled}"


def test_no_progress_fires_when_an_open_transaction_blocks_the_input(live):
    """An upstream producer leaves a transaction open on crawl.raw: read_committed consumers
    cannot read past it, the lag grows, nothing is handled, and the alert fires. Aborting it
    lets the documents behind it through."""
    hung = KafkaProducer(bootstrap_servers=live.bootstrap, transactional_id=f"{live.prefix}-hung",
                         enable_idempotence=True, transaction_timeout_ms=120_000)
    try:
        hung.init_transactions()
        hung.begin_transaction()
        for i in range(6):
            hung.send(live.topics["raw"], value=msgpack.packb({"id": f"hung-{i}", "text": "left open"}), partition=i % 3)
        hung.flush()
        behind = sample_documents(30, seed=12)
        produce(live.bootstrap, live.topics["raw"], [msgpack.packb(d) for d in behind])
        alert = live.prometheus.wait_firing("StreamfilterNoProgress", 60, stage="score")
        assert float(alert["value"]) >= 30
        hung.abort_transaction()
    finally:
        hung.close(timeout=5)

    def scored() -> float:
        return float(live.prometheus.query('sum(streamfilter_documents_total{stage="score"})')[0]["value"][1])

    wait_for(lambda: scored() >= GOOD + BAD + 30, 60, interval_s=1, message="the blocked documents to be scored")


def test_scrape_down_fires_when_the_daemon_stops(live):
    assert live.daemon.terminate() == 0, live.daemon.log()[-3000:]
    alert = live.prometheus.wait_firing("StreamfilterScrapeDown", 60, job="streamfilter")
    assert alert["labels"]["severity"] == "critical" and alert["annotations"]["runbook"]
