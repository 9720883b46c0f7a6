"""Prometheus metrics and the daemon's HTTP endpoints (/metrics, /ready, /live).

Conventions: base units, `_total` counters, `_seconds` histograms, labels of bounded
cardinality only (stage, outcome, reason, policy, model, topic, partition).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
PlatformCollector(registry=REGISTRY)  # python_info


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamfilter")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown"


INPUT_DOCUMENTS = Counter(
    "streamfilter_input_documents_total", "Records read from the stage's input topic (a record read again after "
    "an aborted transaction or a rebalance counts again).", ["stage"], registry=REGISTRY)
DOCUMENTS = Counter(
    "streamfilter_documents_total", "Documents handled, by stage and outcome "
    "(score: scored|dlq; route: accepted|rejected|dlq; sketch: counted|skipped; sink: written|skipped).",
    ["stage", "outcome"], registry=REGISTRY)
DLQ = Counter("streamfilter_dlq_documents_total", "Documents sent to the dead-letter topic, by reason.",
              ["stage", "reason"], registry=REGISTRY)
BATCH_DOCUMENTS = Histogram(
    "streamfilter_batch_documents", "Documents per micro-batch.", ["stage"], registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
INFERENCE_SECONDS = Histogram(
    "streamfilter_inference_seconds", "Model inference time per micro-batch.", ["model"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TRANSFORM_SECONDS = Histogram(
    "streamfilter_transform_seconds", "Time a micro-batch's transform took (decoding, the models or the policy, "
    "encoding).", ["stage"], registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
BATCH_SECONDS = Histogram(
    "streamfilter_batch_seconds", "Time from a micro-batch's poll to its transaction's commit.", ["stage"],
    registry=REGISTRY, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ASKLLM_SCORE = Histogram(
    "streamfilter_askllm_score", "Ask-LLM P(yes) of scored documents.", registry=REGISTRY,
    buckets=tuple(i / 20 for i in range(1, 21)))
DENSITY_SCORE = Histogram(
    "streamfilter_density_score", "Debiased RACE density score of routed documents.", registry=REGISTRY,
    buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000))
KEEP_PROBABILITY = Histogram(
    "streamfilter_keep_probability", "The policy's keep probability of routed documents.", ["policy"],
    registry=REGISTRY, buckets=tuple(i / 10 for i in range(1, 11)))
ACCEPT_RATE_TARGET = Gauge("streamfilter_accept_rate_target", "The policy's target keep rate.", ["policy"],
                           registry=REGISTRY)
DECISIONS = Counter("streamfilter_decisions_total", "Route decisions by policy and decision.",
                    ["policy", "decision"], registry=REGISTRY)
CONSUMER_LAG = Gauge("streamfilter_consumer_lag_records", "High watermark minus position, per input partition.",
                     ["stage", "topic", "partition"], registry=REGISTRY)
DECISION_LATENCY = Histogram(
    "streamfilter_decision_latency_seconds", "From a document's produce timestamp on the raw topic to the commit "
    "of its decision (accepted or rejected).", ["stage"], registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200))
CONSUMER_LAG_SECONDS = Gauge(
    "streamfilter_consumer_lag_seconds", "Age of the oldest unprocessed record per input partition: the produce "
    "timestamp of the oldest record of the last batch taken from it, 0 once the partition is caught up.",
    ["stage", "topic", "partition"], registry=REGISTRY)
SKETCH_DOCUMENTS = Gauge("streamfilter_sketch_documents", "Documents counted in the density sketch.",
                         registry=REGISTRY)
SNAPSHOT_TIMESTAMP = Gauge(
    "streamfilter_snapshot_timestamp_seconds", "Creation time (unix) of the newest snapshot written or loaded.",
    ["stage"], registry=REGISTRY)
SNAPSHOTS_WRITTEN = Counter("streamfilter_snapshots_written_total", "Snapshots written.", registry=REGISTRY)
SNAPSHOTS_CORRUPT = Counter("streamfilter_snapshots_corrupt_total",
                            "Snapshot files skipped because their checksum or format was bad.", registry=REGISTRY)
SINK_SHARDS = Counter("streamfilter_sink_shards_total", "Shards the sink has made visible (renamed or uploaded whole).",
                      ["format"], registry=REGISTRY)
SINK_SHARD_SECONDS = Histogram(
    "streamfilter_sink_shard_write_seconds", "Time to encode, compress and publish one shard.", ["format"],
    registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TRANSACTIONS = Counter("streamfilter_transactions_total", "Kafka transactions by stage and outcome.",
                       ["stage", "outcome"], registry=REGISTRY)
BATCHES_DROPPED = Counter(
    "streamfilter_batches_dropped_total",
    "In-flight micro-batches dropped unproduced (rebalance or a failed transaction); re-read from Kafka.",
    ["stage", "cause"], registry=REGISTRY)
BROKER_UP = Gauge("streamfilter_broker_up", "1 while the stage's last request to the broker succeeded, else 0.",
                  ["stage"], registry=REGISTRY)
RETRIES = Counter("streamfilter_kafka_retries_total", "Kafka operations retried after an error.", ["stage"],
                  registry=REGISTRY)
BUILD_INFO = Info("streamfilter_build", "The running streamfilter version.", registry=REGISTRY)
READY = Gauge("streamfilter_ready", "1 when the stage is processing (models loaded, assigned, snapshot found).",
              ["stage"], registry=REGISTRY)
QUARANTINED = Counter(
    "streamfilter_quarantined_records_total", "Records isolated from their batch after failing a step (model, "
    "encoder, size) and sent to the DLQ alone.", ["stage", "reason"], registry=REGISTRY)
BATCH_RETRIES = Counter(
    "streamfilter_batch_retries_total", "Micro-batches retried, by cause: broker (a Kafka failure; read again after "
    "a backoff), split (a non-broker failure; split in halves to find the culprit), stall (the consumer was "
    "recreated), stage (every record failed alone, and so did one that passed before: the stage itself is broken; read again after a backoff).", ["stage", "cause"], registry=REGISTRY)

# The label values the counters above are exported with from a stage's start (at 0), so that
# rates and alerts see a series before the first increment (register_stage).
QUARANTINE_REASONS = ("model_error", "unencodable", "output_too_large", "stage_error")
BATCH_RETRY_CAUSES = ("broker", "split", "stall", "stage")
BATCH_DROP_CAUSES = ("rebalance", "retry")

BUILD_INFO.info({"version": _version()})


def register_stage(stage: str) -> None:
    """Export the stage's labelled counters at 0 for every known label value.

    Called by `Readiness.register` (which every stage calls when it is built), so a stage's
    quarantine and retry series exist from its start: dashboards show 0, not "no data", and
    `increase()` sees the first increment.
    """
    for reason in QUARANTINE_REASONS:
        QUARANTINED.labels(stage, reason)
    for cause in BATCH_RETRY_CAUSES:
        BATCH_RETRIES.labels(stage, cause)
    if stage in ("score", "route", "replay"):  # the transactional stages: the only ones that drop batches
        for cause in BATCH_DROP_CAUSES:
            BATCHES_DROPPED.labels(stage, cause)


class Readiness:
    """Stages report whether they make progress, with the reason when they do not.

    /ready answers 200 while every registered stage is ready, else 503; its body has one line
    per stage: `<stage> ready` or `<stage> not ready: <reason>`.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._stages: dict[str, tuple[bool, str]] = {}

    def register(self, stage: str) -> None:
        """Add `stage` (not ready, "starting", unless it was registered before) and export its series."""
        with self._lock:
            ready, _ = self._stages.setdefault(stage, (False, "starting"))
        READY.labels(stage).set(1 if ready else 0)
        register_stage(stage)

    def set(self, stage: str, ready: bool, reason: str = "") -> None:
        """Mark `stage` ready, or not ready because of `reason` (one line; ignored when ready)."""
        reason = "" if ready else " ".join(str(reason).split())
        with self._lock:
            self._stages[stage] = (bool(ready), reason)
        READY.labels(stage).set(1 if ready else 0)

    def status(self) -> dict[str, tuple[bool, str]]:
        """stage -> (ready, reason)."""
        with self._lock:
            return dict(self._stages)

    def ready(self) -> tuple[bool, dict[str, bool]]:
        stages = {name: r for name, (r, _) in self.status().items()}
        return bool(stages) and all(stages.values()), stages

    def body(self) -> tuple[bool, str]:
        """(all ready, the /ready body)."""
        stages = self.status()
        lines = [f"{name} ready" if r else f"{name} not ready: {reason}" if reason else f"{name} not ready"
                 for name, (r, reason) in sorted(stages.items())]
        if not stages:
            lines = ["not ready: no stage started yet"]
        return bool(stages) and all(r for r, _ in stages.values()), "".join(line + "\n" for line in lines)


READINESS = Readiness()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/metrics"):
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif self.path.startswith("/ready"):
            ok, body = READINESS.body()
            self._send(200 if ok else 503, body.encode(), "text/plain; charset=utf-8")
        elif self.path.startswith("/live"):
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: try /metrics, /ready or /live\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - keep scrapes out of the logs
        pass


def serve_http(host: str, port: int) -> ThreadingHTTPServer:
    """Start /metrics, /ready and /live on a daemon thread; returns the server (call .shutdown())."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
