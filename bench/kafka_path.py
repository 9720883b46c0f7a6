"""The daemon's Kafka path with scoring replaced by a no-op, against a bare kafka-python loop.

Both consume the same pre-filled raw topic (read_committed, a consumer group each) and
write one output record per input in one transaction per micro-batch with the offsets
sent to the transaction, at the same batch size. The daemon side is the real
`TransactionalLoop` + `ScoreTransform` (record validation, scored-record encoding, DLQ
routing, metrics) with a scorer and embedder that return constants instantly; the bare
side is the loop a user would write by hand (value passed through, padded to the same
size as a scored record).

    .venv/bin/python bench/kafka_path.py [--docs 20000] [--batch 256] [--bootstrap HOST:PORT]

The daemon runs twice: as configured before adaptive batches (fixed 256-record batches and
kafka-python's 16 KiB producer batches) and with today's defaults (batches that grow under a
backlog). Then both run at low load (records produced at a steady rate into an empty topic)
for the latency from each record's produce timestamp to its transaction's commit.

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
from collections.abc import Sequence
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


BEFORE = ("batch.base_batch_docs=256", "batch.max_batch_docs=256", "kafka.producer_batch_bytes=16384")
"""The daemon as it was configured before adaptive batches: fixed 256-record batches, kafka-python's 16 KiB
producer batches (one per partition per produce request)."""


def _daemon_loop(bootstrap: str, raw: str, settings: Sequence[str], on_commit=None):
    from streamfilter.daemon import ensure_topics
    from streamfilter.kafka_loop import TransactionalLoop
    from streamfilter.stages import ScoreTransform

    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    config = load_config(env={}, overrides=[
        f"kafka.bootstrap_servers={bootstrap}", f"kafka.group_prefix={prefix}", "kafka.instance_id=bench",
        f"topics.raw={raw}", f"topics.scored={prefix}.scored", f"topics.dlq={prefix}.dlq", "topics.partitions=1",
        "batch.max_wait_ms=100", "kafka.max_poll_records=2000", *settings,
    ])
    ensure_topics(config, [config.topics.scored, config.topics.dlq])
    return TransactionalLoop("score", config, raw, ScoreTransform.from_config(config, scorer=NoopScorer(), embedder=NoopEmbedder()),
                             on_commit=on_commit)


def run_daemon_path(bootstrap: str, raw: str, n: int, settings: Sequence[str] = ()) -> dict:
    """Drain `n` pre-filled records: docs/s, the process's CPU microseconds per document, mean batch size."""
    from streamfilter import metrics

    batches: list[int] = []
    loop_ = _daemon_loop(bootstrap, raw, settings, on_commit=lambda batch, outputs: batches.append(len(batch.records)))
    scored = metrics.DOCUMENTS.labels("score", "scored")
    start = scored._value.get()

    async def main() -> dict:
        stop = asyncio.Event()
        task = asyncio.ensure_future(loop_.run(stop))
        while scored._value.get() - start < 1:  # first commit: connected, assigned, warmed up
            await asyncio.sleep(0.001)
        t0, c0 = time.perf_counter(), time.process_time()
        first, first_batches = scored._value.get() - start, len(batches)
        while scored._value.get() - start < n:
            await asyncio.sleep(0.002)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        stop.set()
        await task
        timed = batches[first_batches:]
        return {"docs_s": (n - first) / elapsed, "cpu_us": cpu / (n - first) * 1e6,
                "mean_batch": sum(timed) / max(1, len(timed))}

    return asyncio.run(main())


def run_low_load(bootstrap: str, rate: float, seconds: float, settings: Sequence[str] = ()) -> dict:
    """Records produced at `rate`/s into an empty topic: latency from each record's produce timestamp to
    the commit of its transaction (p50, p99, ms) and the mean batch size."""
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    raw = f"bench-slow-{uuid.uuid4().hex[:6]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(raw, num_partitions=1, replication_factor=1)])
    admin.close()
    latencies: list[float] = []
    batches: list[int] = []

    def committed(batch, outputs) -> None:
        now_ms = time.time() * 1000
        latencies.extend(now_ms - r.timestamp for r in batch.records)
        batches.append(len(batch.records))

    loop_ = _daemon_loop(bootstrap, raw, settings, on_commit=committed)
    docs = wiki_documents()
    total = int(rate * seconds)

    def produce() -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            producer.send(raw, value=msgpack.packb({"id": f"s{i}", "text": docs[i % len(docs)].text}))
        producer.flush()
        producer.close()

    async def main() -> dict:
        stop = asyncio.Event()
        task = asyncio.ensure_future(loop_.run(stop))
        while loop_.consumer is None or not loop_.consumer.assignment():
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # assigned and polling: the latencies do not include the group's join
        producer = threading.Thread(target=produce)
        producer.start()
        while len(latencies) < total:
            await asyncio.sleep(0.05)
        producer.join()
        stop.set()
        await task
        p50, p99 = np.percentile(latencies, [50, 99])
        return {"p50_ms": float(p50), "p99_ms": float(p99), "mean_batch": sum(batches) / max(1, len(batches))}

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
    parser.add_argument("--batch", type=int, default=256, help="the bare loop's batch size")
    parser.add_argument("--bootstrap")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the paths this many times each")
    parser.add_argument("--low-load-rate", type=float, default=100.0, help="documents/s for the latency runs")
    parser.add_argument("--low-load-seconds", type=float, default=10.0)
    args = parser.parse_args()
    broker = None
    if args.bootstrap is None:
        broker = KafkaBroker(tempfile.mkdtemp(prefix="bench-broker-"), port=free_port(), heap_mb=1024)
        broker.start()
        args.bootstrap = broker.bootstrap
    try:
        raw = f"bench-raw-{uuid.uuid4().hex[:6]}"
        fill(args.bootstrap, raw, args.docs)
        paths = {
            "bare kafka-python": lambda: {"docs_s": run_bare_path(args.bootstrap, raw, args.docs, args.batch)},
            "daemon, before (fixed 256, 16 KiB producer batches)": lambda: run_daemon_path(
                args.bootstrap, raw, args.docs, BEFORE),
            "daemon, adaptive batches (defaults)": lambda: run_daemon_path(args.bootstrap, raw, args.docs),
        }
        results: dict[str, list[dict]] = {name: [] for name in paths}
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits every path
            for name, run in paths.items():
                results[name].append(run())
        print(f"{args.docs} pre-filled documents (a backlog), one partition, one transaction per batch, "
              f"best of {args.rounds}")
        print("| path | docs/s (best) | runs | CPU µs/doc (best run) | mean batch |")
        print("|---|---|---|---|---|")
        for name, runs in results.items():
            best = max(runs, key=lambda r: r["docs_s"])
            cpu = f"{best['cpu_us']:.0f}" if "cpu_us" in best else "—"
            batch = f"{best['mean_batch']:.0f}" if "mean_batch" in best else str(args.batch)
            spread = ", ".join(f"{r['docs_s']:.0f}" for r in runs)
            print(f"| {name} | {best['docs_s']:.0f} | {spread} | {cpu} | {batch} |")
        print(f"\nLow load: {args.low_load_rate:g} documents/s for {args.low_load_seconds:g} s, produce timestamp -> commit")
        print("| path | p50 ms | p99 ms | mean batch |")
        print("|---|---|---|---|")
        for name, settings in (("daemon, before", BEFORE), ("daemon, adaptive batches", ())):
            r = run_low_load(args.bootstrap, args.low_load_rate, args.low_load_seconds, settings)
            print(f"| {name} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} |")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
