"""A group member whose rebalance finishes between two polls takes its partitions at the next poll.

kafka-python 3.0.12 runs a group's JoinGroup and SyncGroup in the background and finishes the join
(sets the assignment, calls the rebalance listener, turns heartbeats back on) only inside a poll
that waits for it. When a poll gives up first (a short poll: the loop's `poll(0)` while a batch
waits for the work thread) and the round trips complete before the next poll, that poll finds a
done join instead. If the rebalance was the leader's own, after the partitions of its topic
changed, the finished assignment already matches the metadata, `need_rejoin()` answers False and
the join is never finished: no partitions, no heartbeats, no records, until the stage's stall
watch replaces the consumer 12 s later. Every leader meets this once at start (its first
assignment is made before the topic's metadata arrives, and the metadata then asks for a second
one) and again whenever partitions are added to scale out; `tests/deploy/test_live_monitoring.py`
saw the route stall at start in one run of four.
"""

from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewPartitions

from streamfilter.kafka_clients import new_consumer
from streamfilter.kafka_loop import Outputs, TransactionalLoop

from .test_loop_faults import copy_transform, fill, loop_config, read_all, run_loop_until

pytestmark = pytest.mark.kafka


def test_partitions_added_to_the_topic_are_taken_by_a_member_that_polls_briefly(bootstrap, names, create_topics):
    topic = names.topic("grow")
    create_topics({topic: 1})
    config = loop_config(bootstrap, names)
    consumer = new_consumer(config, names.group("grow"), metadata_max_age_ms=500)
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while consumer.assignment() != {TopicPartition(topic, 0)}:
            assert time.monotonic() < deadline, "the consumer never joined its group"
            consumer.poll(timeout_ms=200)

        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_partitions({topic: NewPartitions(total_count=2)})
        admin.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        producer.send(topic, value=b"on the new partition", partition=1).get(timeout=10)
        producer.close()

        # Poll the way a busy stage does: briefly, with other work between polls, long enough for the
        # join's round trips to finish in the background.
        got = []
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            got = [r.value for part in consumer.poll(timeout_ms=0).values() for r in part]
            time.sleep(0.05)
        assert consumer.assignment() == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
        assert got == [b"on the new partition"]
    finally:
        consumer.close(autocommit=False)


def test_a_stage_alone_in_its_group_joins_it_once(bootstrap, names, create_topics):
    """kafka-python's coordinator learns its subscription's partitions from a metadata update that
    races the first join: a leader that assigns before it arrives assigns from no partitions and
    rebalances again at once, aborting the transaction it has in flight (seen at every start of a
    stage: an aborted transaction and a warning for nothing). The loop joins with the metadata
    already seen by the coordinator, so every batch is committed in the first generation."""
    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 3, dst: 3})
    fill(bootstrap, src, {0: 200, 1: 200, 2: 200})
    config = loop_config(bootstrap, names, batch={"base_batch_docs": 16, "max_batch_docs": 16})
    generations, lock = [], threading.Lock()

    def on_commit(batch, outputs) -> None:
        with lock:
            generations.append((batch.group_metadata.generation_id, len(batch.records)))

    loop = TransactionalLoop("score", config, src, copy_transform(dst), on_commit=on_commit)
    run_loop_until(loop, lambda: sum(n for _, n in generations) >= 600, timeout_s=120)
    assert sum(n for _, n in generations) == 600
    assert {g for g, _ in generations} == {1}, f"commits by generation: {generations}"


def test_a_busy_stage_takes_a_partition_added_while_it_runs(bootstrap, names, create_topics):
    """Scaling out by adding partitions, as a user does, under a stage that is busy: its polls are
    short while a batch waits for the transform before it. The new partition's records are
    committed within seconds, every record exactly once."""
    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 1, dst: 1})
    config = loop_config(bootstrap, names, kafka={"metadata_max_age_ms": 500},
                         batch={"max_wait_ms": 20, "base_batch_docs": 4, "max_batch_docs": 4})
    copy = copy_transform(dst)

    def slow_copy(records) -> Outputs:
        time.sleep(0.1)  # a model's work: the next batch closes only when this is done
        return copy(records)

    committed, lock = {}, threading.Lock()

    def on_commit(batch, outputs) -> None:
        with lock:
            for r in batch.records:
                committed[r.value] = time.monotonic()

    stop_producing, added_at, sent = threading.Event(), [], []

    def produce_steadily() -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, metadata_max_age_ms=500)
        i, both = 0, False
        while not stop_producing.is_set():
            if added_at and not both:
                both = 1 in producer.partitions_for(src)  # the producer's metadata has the new partition
            partition = i % 2 if both else 0
            if sum(v.startswith(b"p1-") for v in sent) >= 40:
                break  # 40 records on the new partition
            value = f"p{partition}-{i}".encode()
            producer.send(src, value=value, partition=partition).get(timeout=10)
            sent.append(value)
            i += 1
            time.sleep(0.03)
        producer.close()

    loop = TransactionalLoop("score", config, src, slow_copy, on_commit=on_commit)
    producing = threading.Thread(target=produce_steadily, daemon=True)
    producing.start()

    def done() -> bool:
        with lock:
            n = len(committed)
        if n >= 40 and not added_at:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            admin.create_partitions({src: NewPartitions(total_count=2)})
            admin.close()
            added_at.append(time.monotonic())
        with lock:
            return not producing.is_alive() and set(sent) <= set(committed)

    try:
        run_loop_until(loop, done, timeout_s=60)
    finally:
        stop_producing.set()
        producing.join(30)
    new = [v for v in sent if v.startswith(b"p1-")]
    assert len(new) == 40, f"{len(new)} records sent to the added partition"
    late = [v for v in new if v not in committed]
    assert not late, f"{len(late)} of the added partition's 40 records never committed"
    # The stage takes the partition at its next metadata refresh (0.5 s) and one rebalance. A member
    # that lost its join waited 12 s for the stall watch, or more.
    waited = max(committed[v] for v in new[:5]) - added_at[0]
    assert waited < 8, f"the added partition's first records were committed {waited:.1f} s after it was added"
    values = read_all(bootstrap, dst)
    assert sorted(values) == sorted(sent)  # exactly once
