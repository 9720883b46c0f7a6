"""docs/s of `streamfilter sink` (one-shot, `--until-end`) on a pre-filled accepted topic, next to a
plain read_committed consume of the same topic (the Kafka client's own ceiling).

    .venv/bin/python bench/sink.py [--docs 100000] [--partitions 4] [--bootstrap HOST:PORT]

Without `--bootstrap` a broker is started in a temporary folder. The topic is filled with
Wikipedia summaries encoded as the route writes them (msgpack document, `sf-*` headers), in
transactions of 1,000. Each measurement reads the whole topic from the beginning: the plain
consume decodes nothing; the sink decodes every record (records.py), builds the columns,
compresses and publishes shards of `--shard-docs` documents to a local folder, and writes the
manifest. The sink runs in this process, as `streamfilter sink --until-end` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from streamfilter.broker import KafkaBroker, ensure_jars, free_port  # noqa: E402
from streamfilter.config import load_config  # noqa: E402


def fill(bootstrap: str, topic: str, n: int, partitions: int) -> int:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    from streamfilter.corpus import wiki_documents
    from streamfilter.records import Document, ScoredRecord, encode_document
    from streamfilter.stages.route import decision_headers

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    admin.close()
    wiki = wiki_documents()
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"bench-sink-{uuid.uuid4().hex}",
                             enable_idempotence=True, linger_ms=20, batch_size=1_048_576)
    producer.init_transactions()
    decision = SimpleNamespace(keep=True, policy="askllm+density", snapshot_id="20240501T000000Z-0001",
                               askllm=0.8125, density=3.25, probability=0.4375)
    value_bytes = 0
    for first in range(0, n, 1000):
        producer.begin_transaction()
        for i in range(first, min(n, first + 1000)):
            w = wiki[i % len(wiki)]
            doc = Document(id=f"doc-{i}", text=w.text, url=f"https://en.wikipedia.org/wiki/{i}", lang="en",
                           fetched_at=1714521600 + i, meta={"topic": w.topic})
            scored = ScoredRecord(doc, 0.8125, np.zeros(1, np.float16), "flan-t5-small@abc", "sentence-t5-base@def",
                                  ("crawl.raw", i % partitions, i))
            value = encode_document(doc)
            value_bytes += len(value)
            producer.send(topic, value=value, key=doc.id.encode(), headers=decision_headers(decision, scored))
        producer.commit_transaction()
    producer.close()
    return value_bytes


def plain_consume(bootstrap: str, topic: str, n: int) -> float:
    from kafka.structs import TopicPartition

    from streamfilter.kafka_clients import new_consumer

    config = load_config(env={}, overrides=[f"kafka.bootstrap_servers={bootstrap}"])
    consumer = new_consumer(config, None)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got, started = 0, time.perf_counter()
    while got < n:
        got += sum(len(r) for r in consumer.poll(timeout_ms=500, max_records=config.batch.max_batch_docs).values())
    elapsed = time.perf_counter() - started
    consumer.close()
    return n / elapsed


def sink(bootstrap: str, topic: str, n: int, fmt: str, out: str, shard_docs: int) -> tuple[float, int, int]:
    from streamfilter.stages.sink import ShardSink

    config = load_config(env={}, overrides=[
        f"kafka.bootstrap_servers={bootstrap}", f"kafka.group_prefix=bench-{uuid.uuid4().hex[:8]}",
        f"topics.accepted={topic}", f"sink.path={out}", f"sink.format={fmt}", f"sink.shard_max_docs={shard_docs}",
        "sink.until_end=true", "daemon.metrics_port=0"])
    stage = ShardSink(config)
    started = time.perf_counter()
    asyncio.run(stage.run(asyncio.Event()))
    elapsed = time.perf_counter() - started
    assert stage.done, "the sink did not finish its range"
    files = [f for f in os.listdir(out) if not f.startswith(("_", "."))]
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    return n / elapsed, len(files), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--shard-docs", type=int, default=10_000)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    broker = None
    if args.bootstrap is None:
        ensure_jars()
        broker = KafkaBroker(tempfile.mkdtemp(prefix="bench-sink-broker-"), port=free_port())
        broker.start()
        bootstrap = broker.bootstrap
    else:
        bootstrap = args.bootstrap
    try:
        topic = f"bench.sink.{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        value_bytes = fill(bootstrap, topic, args.docs, args.partitions)
        print(f"filled {topic}: {args.docs} documents, {value_bytes / 1e6:.1f} MB of values, "
              f"{args.partitions} partitions in {time.perf_counter() - t0:.1f}s")
        print(f"{'reader':42s} {'docs/s':>9s} {'shards':>7s} {'MB':>7s}")
        print(f"{'plain read_committed consume':42s} {plain_consume(bootstrap, topic, args.docs):9,.0f}")
        for fmt in ("parquet", "jsonl"):
            out = tempfile.mkdtemp(prefix=f"bench-sink-{fmt}-")
            try:
                rate, shards, size = sink(bootstrap, topic, args.docs, fmt, out, args.shard_docs)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            print(f"{'sink --until-end, ' + fmt + ' (zstd 3)':42s} {rate:9,.0f} {shards:7d} {size / 1e6:7.1f}")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
