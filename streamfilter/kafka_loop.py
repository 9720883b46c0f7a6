"""Consume → transform → produce, exactly once, one Kafka transaction per micro-batch.

This module owns the order of a checkpoint; nothing else in the package commits offsets
for the transactional stages (score, route, replay). For each micro-batch:

  1. poll    records until `max_batch_docs` or `max_wait_ms` (consumer thread, read_committed);
             the batch is stamped with the group generation and the group metadata it was read under
  2. transform  the batch (worker thread: inference, policy) while the next batch is polled
  3. begin_transaction; send every output record (results and DLQ entries)
  4. send_offsets_to_transaction(next offset per partition, the batch's group metadata)
  5. commit_transaction (flushes the sends; the broker marks outputs and offsets committed together)

On any error in 3–5: abort_transaction (or, when the producer is fenced or broken, a new
producer whose init_transactions aborts what the old one left open), drop every batch
still in flight, rewind the consumer to the committed offsets and retry after a backoff.
On a rebalance (revoke) the generation changes: in-flight batches of the old generation
are dropped unproduced, never committed twice; the broker also fences a stale generation's
offset commit (KIP-447), so a batch that slipped through aborts instead of duplicating.
A kill -9 anywhere leaves an open transaction that the restarted process (same
transactional id) aborts in init_transactions, or that the broker times out.

A bounded run (replay) passes `RangeBounds`: the consumer is assigned the range's partitions
instead of joining a group, starts at the group's committed offsets (or the range's start
when it has none), drops records at or past each partition's fixed end and pauses the
partition there; the run completes once every partition has reached its end and the last
batch is committed. The committed offsets carry `RangeBounds.metadata`, so the group's
offsets describe the job and its progress in one place; a restart resumes from them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from streamfilter import metrics
from streamfilter.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """One record to produce inside a micro-batch's transaction."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()


class Outputs(list):
    """A micro-batch's output records, plus the counter increments and the per-document histogram
    observations (scores, keep probabilities) applied only once its transaction commits: a batch
    aborted and read again is counted once, so the metrics match the topics. (Timings of the work
    done are observed when it is done: a retried batch was computed twice.)"""

    def __init__(self, *args):
        super().__init__(*args)
        self.tally: dict[tuple, float] = {}
        self.observations: list[tuple[object, float]] = []  # (histogram, labels applied), value

    def count(self, counter, labels: tuple[str, ...], n: float = 1) -> None:
        key = (counter, labels)
        self.tally[key] = self.tally.get(key, 0) + n

    def observe(self, histogram, value: float) -> None:
        self.observations.append((histogram, value))

    def apply(self) -> None:
        for (counter, labels), n in self.tally.items():
            if n:
                counter.labels(*labels).inc(n)
        for histogram, value in self.observations:
            histogram.observe(value)


@dataclass
class Batch:
    records: list  # kafka ConsumerRecord, in partition order as polled
    generation: int
    group_metadata: Any
    polled_at: float = field(default_factory=time.monotonic)
    at_end: bool = False  # bounded runs: every partition had reached its end when this batch was polled

    def next_offsets(self, metadata: dict | None = None) -> dict:
        """{TopicPartition: OffsetAndMetadata(last offset + 1)}; `metadata` maps partitions to the string stored."""
        from kafka.structs import OffsetAndMetadata, TopicPartition

        last: dict[TopicPartition, int] = {}
        for r in self.records:
            tp = TopicPartition(r.topic, r.partition)
            last[tp] = max(last.get(tp, -1), r.offset)
        meta = metadata or {}
        return {tp: OffsetAndMetadata(offset + 1, meta.get(tp, ""), -1) for tp, offset in last.items()}


@dataclass(frozen=True)
class RangeBounds:
    """A fixed range [start, end) per partition of the input topic, for a bounded run (replay).

    Keys are kafka `TopicPartition`s of the loop's input topic; `end` is fixed before the run
    starts, so the run terminates on a live topic.
    """

    start: dict  # TopicPartition -> first offset, used where the group has no committed offset
    end: dict  # TopicPartition -> offset after the last record of the range (exclusive)
    metadata: dict = field(default_factory=dict)  # TopicPartition -> string committed with the offset


Transform = Callable[[list], list[Output]]
STALL_CHECK_S = 20.0  # polls returning nothing this long while records are readable: recreate the consumer
OnCommit = Callable[[Batch, list[Output]], None]


def kafka_settings(config: Config) -> dict[str, Any]:
    return config.kafka_client_settings()


def new_consumer(config: Config, group: str | None, **overrides):
    from kafka import KafkaConsumer

    settings = dict(
        group_id=group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=config.kafka.max_poll_records,
        fetch_max_bytes=config.kafka.fetch_max_bytes,
        max_partition_fetch_bytes=max(config.records.max_doc_bytes * 2, 1_048_576),
        session_timeout_ms=config.kafka.session_timeout_ms,
        heartbeat_interval_ms=config.kafka.heartbeat_interval_ms,
        **kafka_settings(config),
    )
    settings.update(overrides)
    return KafkaConsumer(**settings)


def new_transactional_producer(config: Config, transactional_id: str):
    from kafka import KafkaProducer

    producer = KafkaProducer(
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_request_size=max(config.records.max_doc_bytes * 3, 4 * 1_048_576),
        transaction_timeout_ms=config.kafka.transaction_timeout_ms,
        max_block_ms=max(10_000, config.kafka.transaction_timeout_ms),
        **kafka_settings(config),
    )
    producer.init_transactions()
    return producer


def broker_connected(consumer) -> bool:
    client = consumer._client  # kafka-python exposes no public connectivity check
    return any(client.connected(b.node_id) for b in client.cluster.brokers())


def stuck_partitions(consumer, stage: str) -> dict:
    """{partition: (position, end)} of the unpaused assigned partitions with readable records ahead
    of the consumer (a read_committed consumer's end offsets are the last stable offsets, so an
    upstream transaction still open does not count); logged as a warning when there are any.
    Empty when there are none or the broker could not be asked (the retry paths handle that)."""
    assigned = consumer.assignment()
    if not assigned:
        return {}
    try:
        ends = consumer.end_offsets(list(assigned))
        paused = consumer.paused()
        behind = {tp: (consumer.position(tp, timeout_ms=1000), end) for tp, end in ends.items() if tp not in paused}
    except Exception as exc:  # noqa: BLE001 - the broker may be away
        log.debug("%s: stall check failed: %s", stage, exc)
        return {}
    stuck = {tp: (p, e) for tp, (p, e) in behind.items() if p is not None and e is not None and p < e}
    if stuck:
        log.warning("%s: no records for %.0fs although %s; recreating the consumer", stage, STALL_CHECK_S,
                    ", ".join(f"{tp.topic}[{tp.partition}] is at {p} of {e}" for tp, (p, e) in sorted(stuck.items())))
    return stuck


class TransactionalLoop:
    """Runs one transactional stage: `transform` maps a micro-batch of input records to outputs."""

    def __init__(self, stage: str, config: Config, input_topic: str, transform: Transform,
                 *, prepare: Callable[[], None] | None = None, group: str | None = None,
                 transactional_id: str | None = None, bounds: RangeBounds | None = None,
                 on_commit: OnCommit | None = None):
        self.stage = stage
        self.config = config
        self.input_topic = input_topic
        self.transform = transform
        self.prepare = prepare  # blocking set-up on the worker thread (load models, wait for a snapshot)
        self.group = group or config.group(stage)
        self.transactional_id = transactional_id or config.transactional_id(stage)
        self.bounds = bounds
        self.on_commit = on_commit  # called on the producer thread after each committed batch
        self.completed = False  # bounded runs: True once every partition's range is committed
        self.generation = 0
        self.rewind_needed = False
        self._records_at = time.monotonic()  # last poll that returned records (stall detection)
        self._stopping = threading.Event()
        self._consumer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-consumer")
        self._producer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-producer")
        self._work_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-work")
        self.consumer = None
        self.producer = None
        metrics.READINESS.register(stage)

    # -- the loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(self._watch_stop(stop))
        try:
            if self.prepare is not None:
                await loop.run_in_executor(self._work_thread, self.prepare)
            await self._connect(stop)
            await self._process(stop, loop)
        finally:
            watcher.cancel()
            await loop.run_in_executor(None, self._close)

    async def _watch_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping.set()

    async def _process(self, stop: asyncio.Event, loop) -> None:
        in_flight: tuple[Batch, asyncio.Future] | None = None
        backoff = _Backoff(self.config.daemon.retry_backoff_max_s)
        while True:
            batch = None
            if not stop.is_set():
                batch = await loop.run_in_executor(self._consumer_thread, self._poll_batch)
            outputs = None
            if in_flight is not None:
                try:
                    outputs = await in_flight[1]
                except Exception:  # noqa: BLE001 - a transform failure is retried like a Kafka failure
                    log.exception("%s: transforming a batch failed; it will be read again", self.stage)
                    outputs = None
            # Start the next transform before committing this one: the model never waits on Kafka.
            next_flight = None
            if batch is not None and batch.records:
                metrics.BATCH_DOCUMENTS.labels(self.stage).observe(len(batch.records))
                metrics.INPUT_DOCUMENTS.labels(self.stage).inc(len(batch.records))
                next_flight = (batch, loop.run_in_executor(self._work_thread, self.transform, batch.records))
            if in_flight is not None:
                done = outputs is not None and await loop.run_in_executor(
                    self._producer_thread, self._commit, in_flight[0], outputs)
                if not done:
                    if next_flight is not None:  # read again after the rewind
                        await asyncio.gather(next_flight[1], return_exceptions=True)
                        metrics.BATCHES_DROPPED.labels(self.stage, "retry").inc()
                        next_flight = None
                    self.generation += 1
                    self.rewind_needed = True
                    await _sleep_or_stop(backoff.next(), stop)
                else:
                    backoff.reset()
                    self.completed = self._range_done(batch, next_flight)  # the last batch is committed
            else:
                self.completed = self._range_done(batch, next_flight)  # nothing (left) to read
            in_flight = next_flight
            if self.completed or (stop.is_set() and in_flight is None):
                return

    def _range_done(self, batch: Batch | None, next_flight) -> bool:
        """A bounded run is complete when a poll found every partition at its end with nothing in flight."""
        return (batch is not None and batch.at_end and next_flight is None and not self.rewind_needed
                and batch.generation == self.generation)

    # -- consumer thread -------------------------------------------------------------

    def _poll_batch(self) -> Batch | None:
        consumer = self.consumer
        records: list = []
        generation = self.generation
        deadline = time.monotonic() + self.config.batch.max_wait_ms / 1000
        limit = self.config.batch.max_batch_docs
        while len(records) < limit and not self._stopping.is_set():
            if self.rewind_needed or self.generation != generation:
                # A failed transaction or a rebalance: everything not committed is read again.
                self._rewind()
                records, generation = [], self.generation
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            polled = consumer.poll(timeout_ms=min(remaining_ms, 200) if records else max(remaining_ms, 50),
                                   max_records=limit - len(records))
            if self.generation != generation:
                continue  # rebalanced inside poll: drop what came with it, rewind, start afresh
            for tp, part in polled.items():
                if self.bounds is not None:
                    end = self.bounds.end[tp]
                    part = [r for r in part if r.offset < end]  # past the range: never read
                records.extend(part)
            if self.bounds is not None and self._pause_finished():
                break
            if time.monotonic() >= deadline and (records or remaining_ms == 0):
                break
        self._observe_lag()
        if records:
            self._records_at = time.monotonic()
        elif time.monotonic() - self._records_at > STALL_CHECK_S:
            self._check_stalled()
        at_end = self.bounds is not None and self._pause_finished()
        if not records or self.generation != generation:
            return Batch([], generation, None, at_end=at_end and self.generation == generation)
        return Batch(records, generation, consumer.group_metadata(), at_end=at_end)

    def _pause_finished(self) -> bool:
        """Pause the partitions whose position reached the range's end; True when all have."""
        consumer = self.consumer
        finished = [tp for tp, end in self.bounds.end.items() if consumer.position(tp) >= end]
        if finished:
            consumer.pause(*finished)
        return len(finished) == len(self.bounds.end)

    def _check_stalled(self) -> None:
        """Recreate the consumer when committed records lie ahead of it and polls keep returning none.

        Seen here under heavy load: a kafka-python consumer, assigned while its partitions were
        empty, never fetched the records committed after. The end offsets a read_committed
        consumer lists are the last stable offsets, so an upstream transaction still open is
        not mistaken for a stall. Recreating counts as a rebalance: in-flight batches are dropped
        and everything uncommitted is read again, so nothing is lost or duplicated.
        """
        self._records_at = time.monotonic()
        consumer = self.consumer
        if not stuck_partitions(consumer, self.stage):
            return
        metrics.RETRIES.labels(self.stage).inc()
        self.generation += 1  # in-flight batches are dropped, as on a rebalance
        try:
            consumer.close(autocommit=False)
        except Exception:  # noqa: BLE001 - replaced either way
            pass
        self.consumer = None
        self._make_consumer()
        self.rewind_needed = True

    def _observe_lag(self) -> None:
        consumer = self.consumer
        connected = broker_connected(consumer)
        metrics.BROKER_UP.labels(self.stage).set(1 if connected else 0)
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                try:
                    position = consumer.position(tp, timeout_ms=100)
                except Exception:  # noqa: BLE001 - lag is best effort; a miss is not an error
                    continue
                if position is not None:
                    metrics.CONSUMER_LAG.labels(self.stage, tp.topic, str(tp.partition)).set(max(0, high - position))

    def _rewind(self) -> None:
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is not None:
                self.consumer.seek(tp, committed)
            elif self.bounds is not None:
                self.consumer.seek(tp, self.bounds.start[tp])
            else:
                self.consumer.seek_to_beginning(tp)
        if self.bounds is not None:
            self.consumer.resume(*self.consumer.paused())  # `_pause_finished` pauses them again at their end
        self.rewind_needed = False

    # -- producer thread ---------------------------------------------------------------

    def _commit(self, batch: Batch, outputs: list[Output]) -> bool:
        """Steps 3–5 of the checkpoint. True when committed; False when aborted (to be read again)."""
        if batch.generation != self.generation:
            metrics.BATCHES_DROPPED.labels(self.stage, "rebalance").inc()
            log.info("%s: dropping a batch of %d read before a rebalance", self.stage, len(batch.records))
            return True  # nothing to retry: the new owner reads these offsets again
        producer = self.producer
        try:
            producer.begin_transaction()
            for out in outputs:
                producer.send(out.topic, value=out.value, key=out.key, headers=list(out.headers))
            producer.send_offsets_to_transaction(
                batch.next_offsets(self.bounds.metadata if self.bounds else None), batch.group_metadata)
            producer.commit_transaction()
        except Exception as exc:  # noqa: BLE001 - every Kafka failure aborts the batch
            metrics.TRANSACTIONS.labels(self.stage, "abort").inc()
            metrics.RETRIES.labels(self.stage).inc()
            metrics.BROKER_UP.labels(self.stage).set(0)
            log.warning("%s: transaction for %d records aborted (%s: %s); retrying from committed offsets",
                        self.stage, len(batch.records), type(exc).__name__, exc)
            self._abort_or_replace_producer()
            return False
        metrics.TRANSACTIONS.labels(self.stage, "commit").inc()
        if isinstance(outputs, Outputs):
            outputs.apply()
        metrics.BROKER_UP.labels(self.stage).set(1)
        metrics.BATCH_SECONDS.labels(self.stage).observe(time.monotonic() - batch.polled_at)
        if self.on_commit is not None:
            self.on_commit(batch, outputs)
        return True

    def _abort_or_replace_producer(self) -> None:
        try:
            self.producer.abort_transaction()
            return
        except Exception as exc:  # noqa: BLE001 - fenced, fatal or broker gone: start a new producer
            log.warning("%s: abort failed (%s); replacing the transactional producer", self.stage, exc)
        try:
            self.producer.close(timeout=1)
        except Exception:  # noqa: BLE001
            pass
        self.producer = None
        while not self._stopping.is_set():
            try:
                self.producer = new_transactional_producer(self.config, self.transactional_id)
                return
            except Exception as exc:  # noqa: BLE001
                metrics.RETRIES.labels(self.stage).inc()
                log.warning("%s: cannot start a transactional producer yet (%s); retrying", self.stage, exc)
                time.sleep(1.0)

    # -- set-up and tear-down -------------------------------------------------------------

    async def _connect(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        backoff = _Backoff(self.config.daemon.retry_backoff_max_s)
        while not stop.is_set():
            try:
                await loop.run_in_executor(self._producer_thread, self._make_producer)
                await loop.run_in_executor(self._consumer_thread, self._make_consumer)
                metrics.BROKER_UP.labels(self.stage).set(1)
                metrics.READINESS.set(self.stage, True)
                log.info("%s: consuming %s as group %s (transactional id %s)", self.stage, self.input_topic,
                         self.group, self.transactional_id)
                return
            except Exception as exc:  # noqa: BLE001 - broker not reachable yet
                metrics.BROKER_UP.labels(self.stage).set(0)
                metrics.RETRIES.labels(self.stage).inc()
                delay = backoff.next()
                log.warning("%s: cannot reach Kafka (%s: %s); retrying in %.1fs", self.stage,
                            type(exc).__name__, exc, delay)
                await _sleep_or_stop(delay, stop)

    def _make_producer(self) -> None:
        if self.producer is None:
            self.producer = new_transactional_producer(self.config, self.transactional_id)

    def _make_consumer(self) -> None:
        from kafka import ConsumerRebalanceListener

        loop_self = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                loop_self.generation += 1  # in-flight batches of the old generation are dropped
                for tp in revoked:
                    try:
                        metrics.CONSUMER_LAG.remove(loop_self.stage, tp.topic, str(tp.partition))
                    except KeyError:
                        pass

            def on_partitions_assigned(self, assigned):
                log.info("%s: assigned %s", loop_self.stage,
                         ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "nothing")

        if self.consumer is None and self.bounds is not None:
            # A bounded run owns its group alone: assigned, not subscribed, so a restart after a
            # kill resumes at once instead of waiting out the dead member's session.
            self.consumer = new_consumer(self.config, self.group)
            self.consumer.assign(sorted(self.bounds.end, key=lambda tp: tp.partition))
            self._rewind()
        elif self.consumer is None:
            consumer = new_consumer(self.config, self.group)
            # Join with the topic's metadata in hand: a group joined before it has the partitions
            # can be handed an empty assignment that kafka-python does not always revisit.
            deadline = time.monotonic() + 30
            while not consumer.partitions_for_topic(self.input_topic):
                if time.monotonic() > deadline:
                    consumer.close()
                    raise RuntimeError(f"topic {self.input_topic} has no partitions (does it exist?)")
                time.sleep(0.5)
            self.consumer = consumer
            self.consumer.subscribe([self.input_topic], listener=Listener())

    def _close(self) -> None:
        metrics.READINESS.set(self.stage, False)
        if self.consumer is not None:
            try:
                self._consumer_thread.submit(self.consumer.close, autocommit=False).result(timeout=10)
            except Exception:  # noqa: BLE001 - closing on shutdown is best effort
                pass
        if self.producer is not None:
            try:
                self.producer.close(timeout=5)
            except Exception:  # noqa: BLE001
                pass
        for pool in (self._consumer_thread, self._producer_thread, self._work_thread):
            pool.shutdown(wait=False, cancel_futures=True)


class _Backoff:
    def __init__(self, max_s: float, first_s: float = 0.2):
        self.max_s, self.first_s, self.current = max_s, first_s, first_s

    def next(self) -> float:
        delay = self.current
        self.current = min(self.max_s, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.first_s


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
