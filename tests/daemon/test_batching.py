"""Adaptive micro-batches: small while input trickles in, large while a backlog waits.

The rule (`BatchSizer`) is pure and tested on its own; the loop is then run against the real
broker on a backlog and on a trickle, and the batch sizes it committed are read back.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
from kafka import KafkaProducer

from streamfilter.kafka_loop import BatchSizer, TransactionalLoop

from .test_loop_faults import copy_transform, fill, loop_config, read_all, run_loop_until


def test_batch_size_doubles_while_batches_fill_and_halves_when_they_close_on_time():
    sizer = BatchSizer(base_docs=256, max_docs=4096, target_s=1.0)
    sizes = []
    for _ in range(6):  # a backlog: every batch fills to the size it was given
        sizer.observe(polled=sizer.size, filled=True)
        sizes.append(sizer.size)
    assert sizes == [512, 1024, 2048, 4096, 4096, 4096]
    sizer.observe(polled=100, filled=False)  # input stopped waiting
    assert sizer.size == 2048
    for _ in range(10):
        sizer.observe(polled=3, filled=False)
    assert sizer.size == 256  # never below the base


def test_batch_size_stops_growing_when_the_transform_is_slow():
    sizer = BatchSizer(base_docs=32, max_docs=4096, target_s=1.0)
    sizer.last_transform_s = 0.2
    sizer.observe(polled=32, filled=True)
    assert sizer.size == 64
    sizer.last_transform_s = 0.6  # more than half the target: a bigger batch would hold records too long
    sizer.observe(polled=64, filled=True)
    assert sizer.size == 64


def test_base_is_clipped_to_the_maximum():
    sizer = BatchSizer(base_docs=256, max_docs=16, target_s=1.0)
    assert sizer.size == 16
    sizer.observe(polled=16, filled=True)
    assert sizer.size == 16  # max_batch_docs is a hard cap: setting it small turns adaptation off


@pytest.mark.kafka
def test_a_backlog_is_committed_in_growing_batches_and_a_trickle_in_small_ones(bootstrap, names, create_topics):
    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 2, dst: 2})
    fill(bootstrap, src, {0: 3000, 1: 3000})
    config = loop_config(bootstrap, names, batch={"base_batch_docs": 64, "max_batch_docs": 2048})
    committed: list[int] = []
    lock = threading.Lock()

    def on_commit(batch, outputs) -> None:
        with lock:
            committed.append(len(batch.records))

    loop = TransactionalLoop("score", config, src, copy_transform(dst), on_commit=on_commit)
    trickle_started = []

    def done() -> bool:
        with lock:
            total = sum(committed)
        if total >= 6000 and not trickle_started:
            trickle_started.append(len(committed))
            producer = KafkaProducer(bootstrap_servers=bootstrap)
            for i in range(12):  # a record now and then: never a backlog
                producer.send(src, value=f"t-{i}".encode(), partition=i % 2)
                producer.flush()
                time.sleep(0.25)
            producer.close()
        return total >= 6012

    run_loop_until(loop, done, timeout_s=120)
    backlog, trickle = committed[:trickle_started[0]], committed[trickle_started[0]:]
    assert max(backlog) > 4 * 64, f"a 6000-record backlog never grew past the base batch: {backlog}"
    assert max(backlog) <= 2048
    assert trickle and max(trickle) < 64, f"batches at a trickle: {trickle}"
    assert loop.sizer.size == 64  # back to the base once input stopped waiting
    values = collections.Counter(read_all(bootstrap, dst))
    expected = {f"p{p}-{i}".encode() for p in (0, 1) for i in range(3000)} | {f"t-{i}".encode() for i in range(12)}
    assert set(values) == expected and max(values.values()) == 1  # exactly once, whatever the batch sizes


@pytest.mark.kafka
def test_a_batch_is_committed_when_its_transform_is_done_not_when_the_next_poll_closes(bootstrap, names,
                                                                                       create_topics):
    """Latency: the commit of a transformed batch never waits out the next batch's `max_wait_ms`."""
    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 1, dst: 1})
    fill(bootstrap, src, {0: 1})
    # Batches of one record close as soon as it is read; the next poll then waits 4 s for input.
    config = loop_config(bootstrap, names, batch={"base_batch_docs": 1, "max_batch_docs": 1, "max_wait_ms": 4000})
    transformed_at, committed_at = [], []
    copy = copy_transform(dst)

    def transform(records):
        outputs = copy(records)
        transformed_at.append(time.monotonic())
        return outputs

    loop = TransactionalLoop("score", config, src, transform,
                             on_commit=lambda batch, outputs: committed_at.append(time.monotonic()))
    run_loop_until(loop, lambda: bool(committed_at), timeout_s=60)
    assert committed_at, "the record was never committed"
    held_s = committed_at[0] - transformed_at[0]
    assert held_s < 2.0, f"the transformed batch waited {held_s:.1f} s for its commit (the next poll's 4 s wait)"
    assert read_all(bootstrap, dst) == [b"p0-0"]


@pytest.mark.kafka
def test_records_that_arrive_while_a_batch_is_transformed_join_the_next_batch(bootstrap, names, create_topics):
    """Latency under load: the next batch stays open until the worker is free, so a record that arrives
    during a long transform waits for that transform only, never for one more batch after it."""
    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 1, dst: 1})
    config = loop_config(bootstrap, names, batch={"max_wait_ms": 1000})
    copy = copy_transform(dst)
    slow_started = threading.Event()
    batches: list[list[bytes]] = []

    def transform(records):
        if records[0].value == b"a":
            slow_started.set()
            time.sleep(4.0)  # the model's time for this batch: longer than max_wait_ms
        return copy(records)

    def on_commit(batch, outputs) -> None:
        batches.append([r.value for r in batch.records])

    loop = TransactionalLoop("score", config, src, transform, on_commit=on_commit)
    producer = KafkaProducer(bootstrap_servers=bootstrap)

    def feed() -> None:
        producer.send(src, value=b"a").get(timeout=30)
        assert slow_started.wait(60)
        producer.send(src, value=b"b").get(timeout=30)  # inside the next poll's max_wait_ms
        time.sleep(2.0)
        producer.send(src, value=b"c").get(timeout=30)  # after it, while "a" is still transformed

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    run_loop_until(loop, lambda: sum(map(len, batches)) >= 3, timeout_s=60)
    feeder.join(10)
    producer.close()
    assert batches == [[b"a"], [b"b", b"c"]], f"batches committed: {batches}"
    assert sorted(read_all(bootstrap, dst)) == [b"a", b"b", b"c"]


@pytest.mark.kafka
def test_an_idle_stage_does_not_spin_when_max_wait_ms_is_small(bootstrap, names, create_topics):
    """With nothing to read, a poll for a batch blocks up to `IDLE_POLL_S` (a record ends it at once),
    whatever `max_wait_ms` is: at 20 ms an idle `run` took 9% of a core instead of 2%."""
    from streamfilter.kafka_loop import IDLE_POLL_S

    src, dst = names.topic("src"), names.topic("dst")
    create_topics({src: 1, dst: 1})
    config = loop_config(bootstrap, names, batch={"max_wait_ms": 0})
    loop = TransactionalLoop("score", config, src, copy_transform(dst))
    polls: list[float] = []  # when each poll for a batch began
    poll_records = loop._poll_records

    def counted():
        polls.append(time.monotonic())
        return poll_records()

    loop._poll_records = counted
    committed = []
    loop.on_commit = lambda batch, outputs: committed.append(time.monotonic())
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    sent = []

    def done() -> bool:
        if polls and not sent and time.monotonic() - polls[0] > 5:  # idle for 5 s, then one record
            producer.send(src, value=b"late").get(timeout=30)
            sent.append(time.monotonic())
        return bool(committed)

    run_loop_until(loop, done, timeout_s=60)
    producer.close()
    idle = [t for t in polls if polls[0] + 1 <= t <= polls[0] + 5]
    assert len(idle) <= 4 / IDLE_POLL_S + 2, f"{len(idle)} polls for a batch in 4 idle seconds"
    assert committed[0] - sent[0] < 2.0, "a record after a quiet spell waited for the idle poll's end"
    assert read_all(bootstrap, dst) == [b"late"]
