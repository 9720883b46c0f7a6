"""The harness is real: transactions isolate aborted batches, and a third-party client (kcat) interoperates."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from kafka import KafkaConsumer, KafkaProducer

pytestmark = pytest.mark.kafka


def drain(consumer: KafkaConsumer, expected: int, max_polls: int = 60) -> list:
    """Poll until `expected` records arrived (or polls run out: then the caller's assert reports it)."""
    out = []
    for _ in range(max_polls):
        for records in consumer.poll(timeout_ms=500).values():
            out.extend(records)
        if len(out) >= expected:
            # one more short poll proves nothing extra is coming
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
            break
    return out


def test_crc32c_uses_the_c_implementation():
    import crc32c
    from kafka.record import util

    assert util._crc32c is crc32c.crc32c


def test_read_committed_consumer_sees_exactly_the_committed_batches(bootstrap, names, create_topics, consumer_config):
    topic = names.topic()
    create_topics({topic: 2})
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=names.prefix, enable_idempotence=True)
    producer.init_transactions()
    batches = [("a", 5, "commit"), ("b", 5, "abort"), ("c", 3, "commit"), ("d", 4, "abort")]
    for tag, n, outcome in batches:
        producer.begin_transaction()
        for i in range(n):
            producer.send(topic, key=f"{tag}{i}".encode(), value=f"{tag}-{i}".encode())
        producer.flush()
        producer.commit_transaction() if outcome == "commit" else producer.abort_transaction()
    producer.close()

    committed = KafkaConsumer(topic, **consumer_config(names.group("committed")))
    seen = sorted(r.value.decode() for r in drain(committed, 8))
    committed.close()
    assert seen == sorted([f"a-{i}" for i in range(5)] + [f"c-{i}" for i in range(3)])

    # The aborted records are really in the log: read_uncommitted sees them all.
    uncommitted = KafkaConsumer(topic, **consumer_config(names.group("uncommitted"), isolation_level="read_uncommitted"))
    assert len(drain(uncommitted, 17)) == 17
    uncommitted.close()


def test_consumer_group_commits_offsets_in_a_transaction(bootstrap, names, create_topics, consumer_config):
    src, dst, group = names.topic("src"), names.topic("dst"), names.group()
    create_topics({src: 1, dst: 1})
    plain = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(10):
        plain.send(src, value=str(i).encode())
    plain.flush()
    plain.close()

    from kafka.structs import OffsetAndMetadata, TopicPartition

    consumer = KafkaConsumer(src, **consumer_config(group))
    records = drain(consumer, 10)
    assert len(records) == 10
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=names.prefix + "-ctp")
    producer.init_transactions()
    producer.begin_transaction()
    for r in records[:6]:
        producer.send(dst, value=r.value)
    tp = TopicPartition(src, 0)
    producer.send_offsets_to_transaction({tp: OffsetAndMetadata(records[5].offset + 1, "", -1)},
                                         consumer.group_metadata())
    producer.commit_transaction()
    producer.close()
    consumer.close()

    again = KafkaConsumer(src, **consumer_config(group))
    rest = drain(again, 4)
    again.close()
    assert [r.value for r in rest] == [str(i).encode() for i in range(6, 10)]


def test_documents_produced_with_kcat_are_read_by_kafka_python(bootstrap, names, create_topics, consumer_config):
    assert shutil.which("kcat"), "kcat is a test peer: apt-get install kcat (make test does)"
    topic = names.topic()
    create_topics({topic: 1})
    docs = [{"id": f"doc-{i}", "url": f"https://example.org/{i}", "text": f"Document number {i} — ünïcode"}
            for i in range(20)]
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    subprocess.run(["kcat", "-P", "-b", bootstrap, "-t", topic], input=lines.encode(), check=True, timeout=60)

    consumer = KafkaConsumer(topic, **consumer_config(names.group()))
    got = [json.loads(r.value) for r in drain(consumer, len(docs))]
    consumer.close()
    assert got == docs
