"""The daemon's Kafka path with scoring replaced by a no-op, against a bare kafka-python loop.

Both consume the same pre-filled raw topic (read_committed, a consumer group each) and
write one output record per input in one transaction per micro-batch with the offsets
sent to the transaction, at the same batch size. The daemon side is the real
`TransactionalLoop` + `ScoreTransform` (record validation, scored-record encoding, DLQ
routing, metrics) with a scorer and embedder that return constants instantly; the bare
side is the loop a user would write by hand (value passed through, padded to the same
size as a scored record).

    .venv/bin/python bench/kafka_path.py [--docs 20000] [--batch 256] [--bootstrap HOST:PORT]

Without --bootstrap a broker is started on a free port in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamfilter.broker import KafkaBroker, free_port  # noqa: E402
from streamfilter.config import load_config  # noqa: E402
from streamfilter.corpus import wiki_documents  # noqa: E402

DIM = 768


class NoopScorer:
    model_id = "noop"

    def score(self, texts, batch_size=0):
        return np.full(len(texts), 0.5, dtype=np.float32)


class NoopEmbedder:
    model_id = "noop"
    dim = DIM

    def embed(self, texts, batch_size=0):
        return np.full((len(texts), DIM), 0.036, dtype=np.float16)


def fill(bootstrap: str, topic: str, n: int) -> None:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()
    docs = wiki_documents()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    for i in range(n):
        producer.send(topic, value=msgpack.packb({"id": f"d{i}", "text": docs[i % len(docs)].text}))
    producer.flush()
    producer.close()


def count(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    total = sum(consumer.end_offsets(tps).values()) if tps else 0
    consumer.close()
    return total  # includes transaction markers: used only as a progress signal


def run_daemon_path(bootstrap: str, raw: str, n: int, batch: int) -> float:
    from streamfilter import metrics
    from streamfilter.daemon import ensure_topics
    from streamfilter.kafka_loop import TransactionalLoop
    from streamfilter.stages import ScoreTransform

    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    config = load_config(env={}, overrides=[
        f"kafka.bootstrap_servers={bootstrap}", f"kafka.group_prefix={prefix}", "kafka.instance_id=bench",
        f"topics.raw={raw}", f"topics.scored={prefix}.scored", f"topics.dlq={prefix}.dlq", "topics.partitions=1",
        f"batch.max_batch_docs={batch}", "batch.max_wait_ms=100", "kafka.max_poll_records=2000",
    ])
    ensure_topics(config, [config.topics.scored, config.topics.dlq])
    loop_ = TransactionalLoop("score", config, raw, ScoreTransform(config, NoopScorer(), NoopEmbedder()))
    scored = metrics.DOCUMENTS.labels("score", "scored")
    start = scored._value.get()

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.ensure_future(loop_.run(stop))
        while scored._value.get() - start < 1:  # first commit: connected, assigned, warmed up
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        first = scored._value.get() - start
        while scored._value.get() - start < n:
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - t0
        stop.set()
        await task
        return (n - first) / elapsed

    return asyncio.run(main())


def run_bare_path(bootstrap: str, raw: str, n: int, batch: int) -> float:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.structs import OffsetAndMetadata, TopicPartition

    prefix = f"bare-{uuid.uuid4().hex[:6]}"
    out = f"{prefix}.out"
    consumer = KafkaConsumer(raw, bootstrap_servers=bootstrap, group_id=prefix, isolation_level="read_committed",
                             enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=2000)
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=prefix, enable_idempotence=True,
                             acks="all", linger_ms=5)
    producer.init_transactions()
    padding = b"\0" * (DIM * 2 + 120)  # what a scored record adds: a float16 embedding and fields
    done = 0
    t0 = None
    first = 0
    while done < n:
        records = []
        deadline = time.monotonic() + 0.1
        while len(records) < batch and time.monotonic() < deadline:
            for part in consumer.poll(timeout_ms=50, max_records=batch - len(records)).values():
                records.extend(part)
        if not records:
            continue
        producer.begin_transaction()
        last = {}
        for r in records:
            producer.send(out, key=r.key, value=r.value + padding)
            last[TopicPartition(r.topic, r.partition)] = r.offset
        producer.send_offsets_to_transaction({tp: OffsetAndMetadata(o + 1, "", -1) for tp, o in last.items()},
                                             consumer.group_metadata())
        producer.commit_transaction()
        done += len(records)
        if t0 is None:
            t0, first = time.perf_counter(), done
    elapsed = time.perf_counter() - t0
    consumer.close()
    producer.close()
    return (n - first) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bootstrap")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two paths this many times each")
    args = parser.parse_args()
    broker = None
    if args.bootstrap is None:
        broker = KafkaBroker(tempfile.mkdtemp(prefix="bench-broker-"), port=free_port(), heap_mb=1024)
        broker.start()
        args.bootstrap = broker.bootstrap
    try:
        raw = f"bench-raw-{uuid.uuid4().hex[:6]}"
        fill(args.bootstrap, raw, args.docs)
        results = {"daemon (no-op scoring)": [], "bare kafka-python": []}
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both
            results["bare kafka-python"].append(run_bare_path(args.bootstrap, raw, args.docs, args.batch))
            results["daemon (no-op scoring)"].append(run_daemon_path(args.bootstrap, raw, args.docs, args.batch))
        print(f"{args.docs} documents, batch {args.batch}, one transaction per batch, best of {args.rounds}")
        for name, values in results.items():
            print(f"  {name:24s} {max(values):8.0f} docs/s   (runs: {', '.join(f'{v:.0f}' for v in values)})")
        ratio = max(results["daemon (no-op scoring)"]) / max(results["bare kafka-python"])
        print(f"  ratio daemon / bare: {ratio:.2f} (goal >= 0.7)")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
