"""Fixtures for replay tests: synthetic scored records on the real broker, a snapshot built from them,
and a config file; plus running `python -m streamfilter replay ...` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from kafka_helpers import MAX_RECORD_BYTES, TOPIC_KINDS, OutputCollector, stream_config, write_config
from streamfilter.density.snapshot_store import SnapshotStore
from streamfilter.density.state import SketchState
from streamfilter.records import Document, ScoredRecord, encode_scored

DIM = 32
SKETCH = {"rows": 100, "buckets": 2000}
TOPICS = ("alpha", "beta", "gamma", "delta")


def scored_records(n: int, seed: int = 0, dim: int = DIM, topic: str = "crawl.raw") -> list[ScoredRecord]:
    """n scored documents: clustered unit embeddings (uneven cluster sizes), Ask-LLM scores, meta.topic."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(TOPICS), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.choice(len(TOPICS), size=n, p=[0.55, 0.25, 0.15, 0.05])
    x = centres[labels] + 0.3 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    askllm = rng.beta(2, 2, size=n)
    return [ScoredRecord(Document(id=f"d{seed}-{i}", text=f"document {i} about {TOPICS[c]}", lang="en",
                                  meta={"topic": TOPICS[c]}),
                         float(a), e.astype(np.float16), "askllm-test", "embedder-test", (topic, 0, i))
            for i, (c, a, e) in enumerate(zip(labels, askllm, x))]


def build_snapshot(records: list[ScoredRecord], directory: Path, rows: int = SKETCH["rows"],
                   buckets: int = SKETCH["buckets"], policy_seed: int = 0, offsets=None) -> Path:
    """A snapshot counting `records` (as the sketch aggregator would), written into `directory`."""
    state = SketchState.create(records[0].embedding.shape[0], rows=rows, buckets=buckets, policy_seed=policy_seed)
    emb = np.stack([r.embedding for r in records]).astype(np.float32)
    state.on_batch([r.document.id for r in records], emb, np.array([r.askllm for r in records]),
                   [(r.source[0], 0, i) for i, r in enumerate(records)])
    if offsets is not None:
        state.offsets = dict(offsets)
    return SnapshotStore(directory).write(state.snapshot())


def produce_scored(bootstrap: str, topic: str, records: list[ScoredRecord], timestamps_ms=None,
                   partitions: int = 3, transaction_docs: int = 0) -> None:
    """Produce scored records round-robin; with `transaction_docs`, in transactions of that many (as the
    score stage writes them: each leaves a commit marker in every partition it touched)."""
    settings = {"transactional_id": f"produce-{topic}"} if transaction_docs else {}
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_request_size=MAX_RECORD_BYTES, **settings)
    if transaction_docs:
        producer.init_transactions()
    for i, record in enumerate(records):
        if transaction_docs and i % transaction_docs == 0:
            if i:
                producer.commit_transaction()
            producer.begin_transaction()
        producer.send(topic, value=encode_scored(record), key=record.document.id.encode(), partition=i % partitions,
                      timestamp_ms=None if timestamps_ms is None else int(timestamps_ms[i]))
    if transaction_docs:
        producer.commit_transaction()
    producer.flush()
    producer.close()


@pytest.fixture
def replay_config(tmp_path, names, bootstrap, create_topics):
    """Write a config whose `topics.scored` holds nothing yet; returns (config path, topics, snapshot dir)."""

    def make(partitions: int = 3, **sections) -> tuple[Path, dict, Path]:
        topics = {k: names.topic(k) for k in TOPIC_KINDS}
        create_topics({t: partitions for t in topics.values()})
        snapshots = tmp_path / "snapshots"
        base = stream_config(bootstrap, names.prefix, topics, partitions)
        base["batch"] = {"max_batch_docs": 256, "max_wait_ms": 200}
        base["sketch"] = {**SKETCH, "snapshot_dir": str(snapshots)}
        base["daemon"]["metrics_port"] = 0
        return write_config(tmp_path / "streamfilter.toml", base, sections), topics, snapshots

    return make


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def streamfilter(*args: str, timeout_s: float = 120) -> Result:
    """Run `python -m streamfilter ARGS` to the end."""
    proc = subprocess.run([sys.executable, "-m", "streamfilter", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start_streamfilter(log_path: Path, *args: str) -> subprocess.Popen:
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "streamfilter", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    return proc


def count_committed(bootstrap: str, topics: list[str], quiet_s: float = 1.0) -> int:
    collector = OutputCollector(bootstrap, topics)
    try:
        last, since = -1, time.monotonic()
        while time.monotonic() - since < quiet_s:
            total = collector.poll(200)
            if total != last:
                last, since = total, time.monotonic()
        return last
    finally:
        collector.close()
