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

import time

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewPartitions

from streamfilter.kafka_clients import new_consumer

from .test_loop_faults import loop_config

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
    import threading

    from streamfilter.kafka_loop import TransactionalLoop

    from .test_loop_faults import copy_transform, fill, run_loop_until

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
