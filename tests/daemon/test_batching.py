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
