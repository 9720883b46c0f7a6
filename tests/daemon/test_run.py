"""`streamfilter run` end to end on the real broker: exactly once across accepted ∪ rejected ∪ DLQ."""

from __future__ import annotations

import collections
import json
import random
import time

import msgpack
import pytest

from kafka_helpers import OutputCollector, produce, wait_for
from streamfilter.density.snapshot_store import SnapshotStore

from .conftest import malformed_values, sample_documents

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def encode(doc: dict, i: int) -> bytes:
    # half msgpack, half JSON: both are accepted input formats
    return msgpack.packb(doc) if i % 2 == 0 else json.dumps(doc).encode()


def ids_of(records) -> list[str]:
    return [msgpack.unpackb(r.value)["id"] for r in records]


def assert_exactly_once(collector: OutputCollector, topics: dict, docs: list[dict], bad: list[bytes]) -> None:
    kept = ids_of(collector.records[topics["accepted"]])
    dropped = ids_of(collector.records[topics["rejected"]])
    dlq_values = [r.value for r in collector.records[topics["dlq"]]]
    counts = collections.Counter(kept + dropped)
    duplicates = [i for i, c in counts.items() if c > 1]
    assert not duplicates, f"{len(duplicates)} documents delivered twice, e.g. {duplicates[:5]}"
    assert set(counts) == {d["id"] for d in docs}, "documents missing from accepted ∪ rejected"
    assert sorted(dlq_values) == sorted(bad), "the DLQ must hold exactly the malformed originals, once each"


def test_5000_documents_exactly_once_with_a_dlq(bootstrap, daemon_config, start_daemon):
    config, topics, snapshots = daemon_config(route={"min_snapshot_docs": 1000})
    docs = sample_documents(4900)
    bad = malformed_values(100)
    values = [encode(d, i) for i, d in enumerate(docs)] + bad
    order = list(range(len(values)))
    random.Random(1).shuffle(order)
    produce(bootstrap, topics["raw"], [values[i] for i in order])

    daemon = start_daemon(config)
    daemon.wait_ready("score")
    collector = OutputCollector(bootstrap, [topics["accepted"], topics["rejected"], topics["dlq"]])
    collector.wait_total(len(values), timeout_s=420, alive=daemon.alive)
    store = SnapshotStore(snapshots)
    wait_for(lambda: store.latest().doc_count == len(docs), 60, message="the sketch to count every document")
    assert daemon.terminate() == 0, daemon.log()[-3000:]
    assert_exactly_once(collector, topics, docs, bad)

    # decisions carry their scores, policy and snapshot in headers
    record = collector.records[topics["accepted"]][0]
    headers = dict(record.headers)
    assert headers["sf-policy"] == b"askllm+density" and headers["sf-snapshot"]
    assert 0.0 <= float(headers["sf-askllm"]) <= 1.0 and float(headers["sf-probability"]) > 0
    # DLQ entries say why
    reasons = collections.Counter(dict(r.headers)["sf-dlq-reason"].decode() for r in collector.records[topics["dlq"]])
    assert set(reasons) >= {"undecodable", "empty_text", "missing_text", "bad_type", "not_a_map", "invalid_utf8",
                            "missing_id"}
    # the keep rate is near the target (the snapshot's reservoir normalises it globally)
    rate = len(collector.records[topics["accepted"]]) / len(docs)
    assert 0.2 < rate < 0.4, rate
    # the sketch counted every scored document once
    assert SnapshotStore(snapshots).latest().doc_count == len(docs)
    collector.close()


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(bootstrap, daemon_config, start_daemon):
    config, topics, snapshots = daemon_config(route={"min_snapshot_docs": 1}, batch={"max_batch_docs": 64})
    docs = sample_documents(3000, seed=7)
    bad = malformed_values(40)
    values = [encode(d, i) for i, d in enumerate(docs)] + bad
    random.Random(2).shuffle(values)
    produce(bootstrap, topics["raw"], values)

    collector = OutputCollector(bootstrap, [topics["accepted"], topics["rejected"], topics["dlq"]])
    rng = random.Random(3)
    kills = 0
    while kills < 5:
        daemon = start_daemon(config, name=f"daemon-{kills}")
        deadline = time.monotonic() + rng.uniform(4, 12)
        while time.monotonic() < deadline:
            collector.poll(200)
        assert daemon.alive(), daemon.log()[-3000:]
        daemon.kill()
        kills += 1
    daemon = start_daemon(config, name="daemon-final")
    collector.wait_total(len(values), timeout_s=420, alive=daemon.alive)
    store = SnapshotStore(snapshots)
    wait_for(lambda: store.latest().doc_count == len(docs), 60, message="the sketch to count every document")
    assert daemon.terminate() == 0, daemon.log()[-3000:]
    assert_exactly_once(collector, topics, docs, bad)
    # each scored document counted exactly once, whatever the kills interrupted
    assert store.latest().doc_count == len(docs)
    collector.close()


def test_the_first_decisions_do_not_wait_for_the_snapshot_timer(bootstrap, daemon_config, start_daemon):
    # A 10-minute snapshot interval: the route still decides as soon as the sketch has counted the
    # first scored batch, because the first snapshot is written once the sketch is warm
    # (route.min_snapshot_docs) and handed to the route of the same process.
    config, topics, snapshots = daemon_config(sketch={"snapshot_interval_s": 600.0},
                                              route={"min_snapshot_docs": 1, "snapshot_poll_s": 30.0})
    daemon = start_daemon(config)
    daemon.wait_ready("score")
    docs = sample_documents(40, seed=11)
    produce(bootstrap, topics["raw"], [encode(d, i) for i, d in enumerate(docs)])
    collector = OutputCollector(bootstrap, [topics["accepted"], topics["rejected"], topics["dlq"]])
    collector.wait_total(len(docs), timeout_s=180, alive=daemon.alive)  # far below the 600 s timer
    assert "handed over in-process" in daemon.log(), daemon.log()[-3000:]
    assert daemon.terminate() == 0, daemon.log()[-3000:]
    assert_exactly_once(collector, topics, docs, [])
    collector.close()
