"""The transactional loop under faults, driven step by step against the real broker.

Each test reproduces one way the exactly-once promise broke (issue "Nothing lost, never
stuck") and checks the group's committed offsets and the read_committed output directly.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import random
import threading
import time

import numpy as np

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from kafka_helpers import OutputCollector, wait_for
from streamfilter.config import load_config
from streamfilter.kafka_loop import Batch, Output, Outputs, TransactionalLoop


pytestmark = pytest.mark.kafka


def loop_config(bootstrap: str, names, **sections):
    overrides = [f"kafka.bootstrap_servers={bootstrap}", f"kafka.group_prefix={names.prefix}",
                 "kafka.instance_id=faults", "kafka.session_timeout_ms=3000", "kafka.heartbeat_interval_ms=500",
                 "kafka.transaction_timeout_ms=10000", "batch.max_wait_ms=200", "daemon.retry_backoff_max_s=1"]
    overrides += [f"{s}.{k}={v}" for s, values in sections.items() for k, v in values.items()]
    return load_config(None, env={}, overrides=overrides)


def copy_transform(output_topic: str):
    def transform(records):
        return Outputs(Output(output_topic, r.value, key=r.key) for r in records)
    return transform


def fill(bootstrap: str, topic: str, per_partition: dict[int, int], start: int = 0) -> None:
    """Values p{partition}-{i} for i from `start`, n per partition."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for partition, n in per_partition.items():
        for i in range(start, start + n):
            producer.send(topic, value=f"p{partition}-{i}".encode(), partition=partition)
    producer.flush()
    producer.close()


def read_all(bootstrap: str, topic: str, quiet_s: float = 2.0) -> list[bytes]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             isolation_level="read_committed", enable_auto_commit=False)
    values, quiet_since = [], time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        got = [r.value for part in consumer.poll(timeout_ms=300).values() for r in part]
        values += got
        if got:
            quiet_since = time.monotonic()
    consumer.close()
    return values


def poll_batches(loop: TransactionalLoop, n: int, timeout_s: float = 30) -> list[Batch]:
    """The loop's own batches (stamped as `_poll_records` stamps them) until they hold `n` records."""
    batches, read, deadline = [], 0, time.monotonic() + timeout_s
    while read < n and time.monotonic() < deadline:
        batch = loop._poll_batch()
        if batch.records:
            batches.append(batch)
            read += len(batch.records)
    assert read == n, f"read {read} of {n} records"
    return batches


def test_offsets_of_an_aborted_batch_never_ride_along_with_the_next_commit(bootstrap, names, create_topics):
    """Observed: a TxnOffsetCommit fenced as a stale member (CommitFailedError: UnknownMemberId)
    aborts; kafka-python keeps its offsets pending, and the next committed transaction wrote them
    too, so the aborted batch's records were marked consumed without ever being produced."""
    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 2, dst: 1})
    fill(bootstrap, src, {0: 10, 1: 10})
    config = loop_config(bootstrap, names)
    loop = TransactionalLoop("score", config, src, copy_transform(dst))
    try:
        loop._make_producer()
        loop._make_consumer()
        records = [r for b in poll_batches(loop, 20) for r in b.records]
        meta = loop.consumer.group_metadata()
        first = [r for r in records if r.partition == 0]
        second = [r for r in records if r.partition == 1]

        stale = meta._replace(member_id="a-member-that-left-the-group")
        aborted = Batch(first, loop.generation, stale)
        assert loop._commit(aborted, copy_transform(dst)(first)) is False

        assert loop._commit(Batch(second, loop.generation, meta), copy_transform(dst)(second)) is True

        tp0, tp1 = TopicPartition(src, 0), TopicPartition(src, 1)
        assert loop.consumer.committed(tp1) == 10
        assert loop.consumer.committed(tp0) is None, "the aborted batch's offsets were committed"
        assert sorted(read_all(bootstrap, dst)) == sorted(r.value for r in second)
    finally:
        loop._close()


def test_a_batch_of_a_member_that_has_left_the_group_is_never_committed(bootstrap, names, create_topics,
                                                                        monkeypatch):
    """Seen in CI (two scorers, the broker SIGKILLed and restarted): 80 raw records scored twice.
    Once kafka-python learns that its member is out of the group (a heartbeat answered UNKNOWN_MEMBER_ID
    after the session expired; a poll timeout, after which it leaves), it reports generation -1 and
    no member id until it rejoins, and the broker takes a TxnOffsetCommit carrying those as one from
    a client older than KIP-447: unfenced. A batch stamped so was committed although the partition's
    new owner had read the same records again."""
    from streamfilter import kafka_loop

    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 1, dst: 1})
    fill(bootstrap, src, {0: 10})
    config = loop_config(bootstrap, names)
    left = TransactionalLoop("score", config, src, copy_transform(dst), transactional_id=f"{names.prefix}.left")
    owner = TransactionalLoop("score", config, src, copy_transform(dst), transactional_id=f"{names.prefix}.owner")
    real_consumer = kafka_loop.new_consumer
    try:
        left._make_producer()
        # a real member that leaves the group after 3 s without a poll (kafka-python's poll timeout)
        monkeypatch.setattr(kafka_loop, "new_consumer",
                            lambda config, group, **kw: real_consumer(config, group, max_poll_interval_ms=3000, **kw))
        left._make_consumer()
        monkeypatch.setattr(kafka_loop, "new_consumer", real_consumer)
        records = [r for b in poll_batches(left, 10) for r in b.records]
        wait_for(lambda: left.consumer.group_metadata().generation_id < 0, 30, 0.2, "the member to leave the group")

        # the partition's new owner reads the records again and commits them
        owner._make_producer()
        owner._make_consumer()
        for batch in poll_batches(owner, 10):
            assert owner._commit(batch, copy_transform(dst)(batch.records))

        # the member that left: its records, stamped with its group membership as it reports it now
        late = Batch(records, left.generation, left.consumer.group_metadata())
        left._commit(late, copy_transform(dst)(records))
        assert sorted(read_all(bootstrap, dst)) == sorted(r.value for r in records), "a batch was committed twice"
        assert owner.consumer.committed(TopicPartition(src, 0)) == 10
        assert left.rewind_needed, "the records it dropped must be read again if it is handed the partition back"
    finally:
        left._close()
        owner._close()


def test_a_consumer_that_cannot_be_recreated_while_the_broker_is_away_is_made_again_later(own_broker, names):
    """Seen in the scaled-out chaos test: the route's stall watch replaced its consumer at the moment
    the broker was SIGKILLed; making the new one failed, the loop was left with none, and every
    poll after the broker came back failed on it ('NoneType' object has no attribute 'assignment'):
    the route never read again."""
    from kafka.admin import KafkaAdminClient, NewTopic

    bootstrap = own_broker.bootstrap
    src, dst = names.topic("src"), names.topic("dst")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(src, 1, 1), NewTopic(dst, 1, 1)])
    admin.close()
    fill(bootstrap, src, {0: 20})
    loop = TransactionalLoop("route", loop_config(bootstrap, names), src, copy_transform(dst))
    try:
        loop._make_producer()
        loop._make_consumer()
        own_broker.stop()
        with pytest.raises(Exception):
            loop._recreate_consumer()  # what the stall watch does; the broker is away
        own_broker.start()
        batches = poll_batches(loop, 20, timeout_s=60)
        for batch in batches:
            assert loop._commit(batch, copy_transform(dst)(batch.records))
        assert sorted(read_all(bootstrap, dst)) == sorted(f"p0-{i}".encode() for i in range(20))
    finally:
        loop._close()


def test_partitions_handed_back_are_read_from_the_committed_offsets(bootstrap, names, create_topics):
    """Seen in the scaled-out chaos test: a scorer revoked its partitions, missed the generation
    that gave them to the other scorer, and was handed them back one generation later. kafka-python
    keeps a partition's position across an eager rebalance when the partition comes back, and the
    loop had rewound when the partitions were revoked, before the other scorer committed: it read
    that scorer's batch again. Here the rebalance spans two of the loop's polls, and the other
    owner's commit lands between them, as the partition is handed back (a transaction carrying no
    group generation, which the broker takes unfenced, stands in for its commit)."""
    from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 1, dst: 1})
    fill(bootstrap, src, {0: 10})
    tp = TopicPartition(src, 0)
    loop = TransactionalLoop("score", loop_config(bootstrap, names), src, copy_transform(dst),
                             transactional_id=f"{names.prefix}.loop")

    def other_owner_commits() -> None:  # copies 10..14 and commits offset 15
        producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{names.prefix}.other")
        producer.init_transactions()
        producer.begin_transaction()
        for i in range(10, 15):
            producer.send(dst, value=f"p0-{i}".encode())
        producer.send_offsets_to_transaction({tp: OffsetAndMetadata(15, "", -1)},
                                             ConsumerGroupMetadata(loop.group, -1, "", None))
        producer.commit_transaction()
        producer.close()

    stop = threading.Event()

    def foreign() -> None:  # joins (a rebalance; sorted after the loop, it is given nothing) and stays
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=loop.group, client_id="zz-foreign",
                                 enable_auto_commit=False, session_timeout_ms=3000, heartbeat_interval_ms=500)
        consumer.subscribe([src])
        while not stop.is_set():
            consumer.poll(timeout_ms=200)
        consumer.close(autocommit=False)

    thread = threading.Thread(target=foreign, daemon=True)
    try:
        loop._make_producer()
        loop._make_consumer()
        for batch in poll_batches(loop, 10):
            assert loop._commit(batch, copy_transform(dst)(batch.records))
        # The rebalance spans polls, as a slow join does: the loop's poll that revokes returns before
        # the partition is handed back, and the other owner's commit comes in between.
        listener = loop.consumer._subscription.rebalance_listener
        revoked, assigned = listener.on_partitions_revoked, listener.on_partitions_assigned
        handed_back = []

        def on_partitions_revoked(partitions):
            revoked(partitions)
            time.sleep(1.0)  # longer than the loop's poll: the join completes in a later one

        def on_partitions_assigned(partitions):
            if not handed_back:
                handed_back.append(set(partitions))
                fill(bootstrap, src, {0: 10}, start=10)
                other_owner_commits()
            assigned(partitions)

        listener.on_partitions_revoked = on_partitions_revoked
        listener.on_partitions_assigned = on_partitions_assigned
        thread.start()
        deadline = time.monotonic() + 60
        while len(read_all(bootstrap, dst, quiet_s=0.5)) < 20 and time.monotonic() < deadline:
            batch = loop._poll_batch()
            if batch.records:
                assert loop._commit(batch, copy_transform(dst)(batch.records))
        assert handed_back == [{tp}]
        assert sorted(read_all(bootstrap, dst)) == sorted(f"p0-{i}".encode() for i in range(20)), (
            "records another owner committed were read again")
    finally:
        stop.set()
        thread.join(10)
        loop._close()


class MarkerScorer:
    """A real-shaped scorer pair whose model raises on one marker text, as a tokenizer or runtime would."""

    model_id, dim = "marker-askllm@1", 4

    def score(self, texts, batch_size=32):
        if any("POISON-MODEL" in t for t in texts):
            raise RuntimeError("the runtime failed on this input")
        return np.full(len(texts), 0.5, dtype=np.float32)

    def embed(self, texts, batch_size=32):
        out = np.ones((len(texts), self.dim), dtype=np.float16)
        if any("POISON-ENCODER" in t for t in texts):
            out = out.astype(object)
            out[[i for i, t in enumerate(texts) if "POISON-ENCODER" in t]] = "not a number"
        return out


def run_loop_until(loop: TransactionalLoop, done, timeout_s: float) -> None:
    """Run `loop` on its own event loop thread until `done()` or the timeout, then stop it."""
    stop_flag = threading.Event()

    async def main():
        stop = asyncio.Event()
        task = asyncio.ensure_future(loop.run(stop))
        while not stop_flag.is_set() and not task.done():
            await asyncio.sleep(0.1)
        stop.set()
        await task

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and thread.is_alive() and not done():
            time.sleep(0.5)
    finally:
        stop_flag.set()
        thread.join(60)
    assert not thread.is_alive(), "the loop did not stop"


def test_poison_records_go_to_the_dlq_alone_and_the_stage_never_stops(bootstrap, names):
    from kafka.admin import KafkaAdminClient, NewTopic

    from streamfilter.kafka_clients import SizeLimits
    from streamfilter.records import decode_scored
    from streamfilter.stages import ScoreTransform

    raw, scored, dlq = names.topic("raw"), names.topic("scored"), names.topic("dlq")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=3, replication_factor=1,
                                  topic_configs={"max.message.bytes": str(16 * 1_048_576)}) for t in (raw, scored, dlq)])
    admin.close()
    config = loop_config(bootstrap, names, records={"max_doc_bytes": 65536}, batch={"max_batch_docs": 64},
                         topics={"raw": raw, "scored": scored, "dlq": dlq})
    cap = SizeLimits.of(config).dlq_value_bytes
    huge = json.dumps({"id": "huge", "text": "x" * (5 * 1_048_576)}).encode()  # over the producer's limit whole
    rng = random.Random(4)
    good, poison = [], {}
    for i in range(400):
        good.append(json.dumps({"id": f"good-{i}", "text": f"Document {i} about the history of rivers."}).encode())
    poison["model"] = [json.dumps({"id": f"pm-{i}", "text": f"POISON-MODEL {i}"}).encode() for i in range(5)]
    poison["encoder"] = [json.dumps({"id": f"pe-{i}", "text": f"POISON-ENCODER {i}"}).encode() for i in range(3)]
    poison["decoder"] = [b"\xc1 not msgpack, not json %d" % i for i in range(4)]
    poison["huge"] = [huge]
    values = good + [v for vs in poison.values() for v in vs]
    rng.shuffle(values)
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1_048_576)
    for i, value in enumerate(values):
        producer.send(raw, value=value, partition=i % 3)
    producer.flush()
    producer.close()

    from streamfilter import metrics

    def quarantined(reason):
        return metrics.QUARANTINED.labels("score", reason)._value.get()

    before = {r: quarantined(r) for r in ("model_error", "unencodable")}
    collector = OutputCollector(bootstrap, [scored, dlq])
    loop = TransactionalLoop("score", config, raw, ScoreTransform.from_config(config, scorer=MarkerScorer(), embedder=MarkerScorer()))
    run_loop_until(loop, lambda: collector.poll(200) >= len(values), timeout_s=120)
    collector.wait_total(len(values), timeout_s=10)
    collector.close()

    ids = collections.Counter(decode_scored(r.value).document.id for r in collector.records[scored])
    assert sorted(ids) == sorted(f"good-{i}" for i in range(400)) and max(ids.values()) == 1
    dlq_records = collector.records[dlq]
    reasons = {r.value if "sf-dlq-truncated" not in dict(r.headers) else dict(r.headers)["sf-dlq-original-sha256"]:
               dict(r.headers)["sf-dlq-reason"].decode() for r in dlq_records}
    assert len(dlq_records) == sum(len(vs) for vs in poison.values())
    assert {reasons[v] for v in poison["model"]} == {"model_error"}
    assert {reasons[v] for v in poison["encoder"]} == {"unencodable"}
    assert {reasons[v] for v in poison["decoder"]} == {"undecodable"}
    (entry,) = [r for r in dlq_records if "sf-dlq-truncated" in dict(r.headers)]
    headers = dict(entry.headers)
    assert headers["sf-dlq-reason"] == b"too_large" and entry.value == huge[:cap]
    assert headers["sf-dlq-original-bytes"] == str(len(huge)).encode()
    assert headers["sf-dlq-original-sha256"] == hashlib.sha256(huge).hexdigest().encode()
    model_entry = next(r for r in dlq_records if r.value == poison["model"][0])
    assert dict(model_entry.headers)["sf-dlq-error"] == b"RuntimeError"
    # counted once each, when their transactions committed
    assert {r: quarantined(r) - before[r] for r in before} == {"model_error": 5, "unencodable": 3}


def test_a_model_that_fails_on_everything_quarantines_nothing_and_resumes_when_it_recovers(bootstrap, names):
    """A broken stage is not bad input: while the model fails on every document (and on one it
    scored before), nothing goes to the DLQ; /ready says why; once it recovers, all are scored."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from streamfilter import metrics
    from streamfilter.records import decode_scored
    from streamfilter.stages import ScoreTransform

    raw, scored, dlq = names.topic("raw"), names.topic("scored"), names.topic("dlq")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=2, replication_factor=1) for t in (raw, scored, dlq)])
    admin.close()
    config = loop_config(bootstrap, names, batch={"max_batch_docs": 16}, topics={"raw": raw, "scored": scored, "dlq": dlq})

    class Flaky(MarkerScorer):
        broken = False

        def score(self, texts, batch_size=32):
            if self.broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().score(texts, batch_size)

    model = Flaky()

    def send(first: int, n: int) -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for i in range(first, first + n):
            producer.send(raw, json.dumps({"id": f"d{i}", "text": f"Document {i} on glaciers."}).encode())
        producer.flush()
        producer.close()

    collector = OutputCollector(bootstrap, [scored, dlq])
    loop = TransactionalLoop("score", config, raw, ScoreTransform.from_config(config, scorer=model, embedder=MarkerScorer()))
    seen_reason = []

    def done() -> bool:
        total = collector.poll(200)
        if total >= 20 and not model.broken and not seen_reason:
            model.broken = True
            send(20, 30)
        elif model.broken:
            ready, reason = metrics.READINESS.status()["score"]
            if not ready and "failing" in reason:
                seen_reason.append(reason)
                time.sleep(2)  # a few more retries while broken
                assert not collector.records[dlq], "documents quarantined while the stage was broken"
                model.broken = False
        return len(collector.records[scored]) >= 50

    send(0, 20)
    run_loop_until(loop, done, timeout_s=120)
    collector.wait_total(50, timeout_s=10)
    collector.close()
    assert seen_reason and "CUDA error" in seen_reason[0]
    assert not collector.records[dlq]
    ids = collections.Counter(decode_scored(r.value).document.id for r in collector.records[scored])
    assert sorted(ids) == sorted(f"d{i}" for i in range(50)) and max(ids.values()) == 1


def test_a_record_the_broker_refuses_is_quarantined_and_its_batch_commits_in_halves(bootstrap, names):
    """The topic's own limit, smaller than the daemon's (changed after start-up, or a loop run without
    `ensure_topics`): the broker refuses one scored record; its transaction is committed in halves
    and that document goes to the DLQ alone."""
    from kafka.admin import KafkaAdminClient, NewTopic

    from streamfilter import metrics
    from streamfilter.records import decode_scored
    from streamfilter.stages import ScoreTransform

    raw, scored, dlq = names.topic("raw"), names.topic("scored"), names.topic("dlq")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(raw, 2, 1), NewTopic(dlq, 2, 1, topic_configs={"max.message.bytes": "4194304"}),
                         NewTopic(scored, 2, 1, topic_configs={"max.message.bytes": "100000"})])
    admin.close()
    config = loop_config(bootstrap, names, records={"max_doc_bytes": 300_000}, batch={"max_batch_docs": 64},
                         topics={"raw": raw, "scored": scored, "dlq": dlq})
    big = json.dumps({"id": "big", "text": "word " * 40_000}).encode()  # 200 kB: fine for the daemon, not the topic
    values = [json.dumps({"id": f"d{i}", "text": f"Document {i} on deltas."}).encode() for i in range(60)]
    values.insert(37, big)
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=4_194_304)
    for i, value in enumerate(values):
        producer.send(raw, value=value, partition=i % 2)
    producer.flush()
    producer.close()
    splits = metrics.BATCH_RETRIES.labels("score", "split")._value.get()

    collector = OutputCollector(bootstrap, [scored, dlq])
    loop = TransactionalLoop("score", config, raw, ScoreTransform.from_config(config, scorer=MarkerScorer(), embedder=MarkerScorer()))
    run_loop_until(loop, lambda: collector.poll(200) >= len(values), timeout_s=120)
    collector.wait_total(len(values), timeout_s=10)
    collector.close()

    ids = collections.Counter(decode_scored(r.value).document.id for r in collector.records[scored])
    assert sorted(ids) == sorted(f"d{i}" for i in range(60)) and max(ids.values()) == 1
    (entry,) = collector.records[dlq]
    assert entry.value == big and dict(entry.headers)["sf-dlq-reason"] == b"output_too_large"
    assert metrics.BATCH_RETRIES.labels("score", "split")._value.get() > splits
