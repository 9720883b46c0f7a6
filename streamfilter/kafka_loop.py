"""Consume → transform → produce, exactly once, one Kafka transaction per micro-batch.

This module owns the order of a checkpoint and the failure model of the transactional stages
(score, route, replay); nothing else in the package commits their offsets. The clients, their
timeouts, size limits and health probes are `kafka_clients`'. For each micro-batch:

  1. poll    records until the batch's size (`BatchSizer`: it grows under a backlog, up to
             `max_batch_docs`/`max_batch_bytes`), or until `max_wait_ms` has passed and the work
             thread is free (consumer thread, read_committed): a batch never closes while the one
             before it is still transformed, so a record waits for at most that one transform;
             the batch is stamped with the group generation and the group metadata it was read under
  2. transform  the batch (work thread: inference, policy) while the next batch is polled
  then, on the producer thread, as soon as the transform is done (the next poll goes on meanwhile,
  and the next transform may start before this commit is known):
  3. begin_transaction; send every output record (results and DLQ entries)
  4. send_offsets_to_transaction(next offset per partition, the batch's group metadata)
  5. commit_transaction (flushes the sends; the broker marks outputs and offsets committed together)

Failure model:

- **One record, never the batch.** A transform that raises is retried on the two halves of
  the batch, recursively, until the record that raises is alone; that record goes to the DLQ
  (`quarantined`, reason `model_error`, `unencodable`, `output_too_large`, ... or `stage_error`)
  and the rest of the batch goes on in the same transaction. Outputs are checked against the
  producer's limits before anything is sent. A transaction the producer or broker refuses for
  what it carries (a record too large, an invalid record) is split the same way, committing each
  half on its own. If every record of a batch fails alone and so does the last record that
  passed before (the canary), the stage itself is broken, not its input (a model that fails on
  everything): nothing is quarantined and the batch is retried after a backoff.
- **The broker's failures are retried**, with backoff and jitter, for as long as it takes. Any
  error in 3–5 aborts the transaction and **replaces the producer**: the new producer's
  init_transactions starts clean and waits until the broker has finished the old transaction,
  because kafka-python keeps the offsets of a failed TxnOffsetCommit after an abort and would
  send them with the next transaction (a lost batch, or a partition moved backwards). Every batch
  still in flight is dropped, the consumer rewinds to the committed offsets (fetched as stable
  offsets) and reads again.
- **Rebalances**: on revoke and again on assignment the generation changes; in-flight batches of
  the old generation are dropped unproduced, never committed twice, and every assigned partition
  is read again from its committed offset (kafka-python keeps the position of a partition that is
  assigned again, which another member may have committed past in a generation this one missed);
  the broker also fences a stale generation's offset commit (KIP-447), so a batch that slipped
  through aborts instead of duplicating. The broker cannot fence a batch stamped after the member
  learned it is out of the group (an expired session, a poll timeout) and before it rejoined:
  kafka-python reports no generation then, which the broker takes for a pre-KIP-447 client. Such
  a batch is dropped like a rebalance's.
- **Kill -9 anywhere** leaves an open transaction that the restarted process (same
  transactional id) aborts in init_transactions, or that the broker times out.
- **Stalls**: a consumer that stops fetching while records are readable is recreated
  (`kafka_clients.ConsumerWatch`), which counts as a rebalance.

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
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from streamfilter import metrics
from streamfilter.config import Config
from streamfilter.errors import InvalidDocument
from streamfilter.kafka_clients import (
    Backoff, ConsumerWatch, SizeLimits, StageHealth, end_transaction, forget_lag, is_record_failure, new_consumer,
    new_transactional_producer, pending_offsets, record_size, send_offsets, txn_wait_ms,
)
from streamfilter.records import dlq_headers, dlq_json, dlq_value

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
        self.since: list[tuple[object, float]] = []  # (histogram, labels applied), unix seconds

    def count(self, counter, labels: tuple[str, ...], n: float = 1) -> None:
        key = (counter, labels)
        self.tally[key] = self.tally.get(key, 0) + n

    def observe(self, histogram, value: float) -> None:
        self.observations.append((histogram, value))

    def observe_since(self, histogram, since_unix_s: float) -> None:
        """Observe the time from `since_unix_s` to this batch's commit (a produce-to-decision latency)."""
        self.since.append((histogram, since_unix_s))

    def add_dlq(self, topic: str, stage: str, exc: InvalidDocument, record, cap_bytes: int,
                error: str | None = None, fmt: str = "msgpack") -> None:
        """The DLQ entry for input `record`: its original bytes (at most `cap_bytes`, else a prefix with
        the original's size and sha256 in headers) and the reason headers; counted on commit. With
        `fmt = "json"` (output.format) the value is a JSON object of the same, the bytes in base64."""
        value, extra = dlq_value(record.value, cap_bytes)
        headers = dlq_headers(exc, stage, record.topic, record.partition, record.offset, error)
        if fmt == "json":
            value = dlq_json(value, headers + extra)
        self.count(metrics.DLQ, (stage, exc.reason))
        self.count(metrics.DOCUMENTS, (stage, "dlq"))
        if exc.reason in metrics.QUARANTINE_REASONS:  # failed a step on its own, not invalid input
            self.count(metrics.QUARANTINED, (stage, exc.reason))
        self.append(Output(topic, value, key=record.key, headers=headers + extra))

    def merge(self, other: "Outputs") -> "Outputs":
        self.extend(other)
        for key, n in other.tally.items():
            self.tally[key] = self.tally.get(key, 0) + n
        self.observations.extend(other.observations)
        self.since.extend(other.since)
        return self

    def apply(self) -> None:
        for (counter, labels), n in self.tally.items():
            if n:
                counter.labels(*labels).inc(n)
        for histogram, value in self.observations:
            histogram.observe(value)
        now = time.time()
        for histogram, since in self.since:
            histogram.observe(max(0.0, now - since))


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

    def halves(self) -> tuple["Batch", "Batch"]:
        """Two batches that together are this one. Each partition's records are in offset order in
        `records`, so any prefix of it holds a prefix of every partition: each half commits alone."""
        mid = len(self.records) // 2
        return (Batch(self.records[:mid], self.generation, self.group_metadata, self.polled_at),
                Batch(self.records[mid:], self.generation, self.group_metadata, self.polled_at))


class BatchSizer:
    """How many records the next micro-batch may take: small at low load, large under a backlog.

    A batch that fills to the current size while input keeps arriving means records are
    waiting: the size doubles (up to `max_docs`), so the per-transaction cost (three round
    trips and a marker per partition) is spread over more records, but only while the
    previous batch's transform took less than half of `target_s`, so a slow model never builds
    batches that hold records (and the consumer's poll) for long. A batch that closes on time
    with fewer records means input is not waiting: the size halves back toward `base_docs`,
    and latency at low load is what `max_wait_ms` makes it (plus the transform and the commit).
    """

    def __init__(self, base_docs: int, max_docs: int, target_s: float):
        self.max_docs = max(1, max_docs)
        self.base_docs = max(1, min(base_docs, self.max_docs))
        self.target_s = target_s
        self.size = self.base_docs
        self.last_transform_s: float | None = None  # set by the work thread

    def observe(self, polled: int, filled: bool) -> None:
        """After a poll: `polled` records, `filled` when the batch closed because it reached a size limit."""
        if filled and polled >= self.size:
            if self.last_transform_s is None or 2 * self.last_transform_s < self.target_s:
                self.size = min(2 * self.size, self.max_docs)
        elif polled < self.size:
            self.size = max(self.base_docs, self.size // 2)


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
OnCommit = Callable[[Batch, list[Output]], None]


class StageFailure(Exception):
    """Every record of a batch failed on its own: the stage is broken, not its input."""


WORK_WAIT_S = 0.02  # how often a batch that waits for the work thread takes in what arrived meanwhile
IDLE_POLL_S = 0.2  # the longest an idle stage's poll blocks (a record ends it at once); sketch and sink too


class TransactionalLoop:
    """Runs one transactional stage: `transform` maps a micro-batch of input records to outputs."""

    def __init__(self, stage: str, config: Config, input_topic: str, transform: Transform,
                 *, prepare: Callable[[], None] | None = None, group: str | None = None,
                 transactional_id: str | None = None, bounds: RangeBounds | None = None,
                 on_commit: OnCommit | None = None, dlq_topic: str | None = None):
        self.stage = stage
        self.config = config
        self.input_topic = input_topic
        self.transform = transform
        self.prepare = prepare  # blocking set-up on the worker thread (load models, wait for a snapshot)
        self.group = group or config.group(stage)
        self.transactional_id = transactional_id or config.transactional_id(stage)
        self.bounds = bounds
        self.on_commit = on_commit  # called on the producer thread after each committed batch
        self.dlq_topic = dlq_topic or config.topics.dlq  # where quarantined records go
        self.limits = SizeLimits.of(config)
        self.txn_wait_ms = txn_wait_ms(config)
        self.completed = False  # bounded runs: True once every partition's range is committed
        self.generation = 0
        self.rewind_needed = False
        self._generation_lock = threading.Lock()  # bumped from the consumer thread and the producer thread
        self._transforms_pending = 0  # batches given to the work thread and not yet transformed
        self._work_lock = threading.Lock()
        self._work_idle = threading.Event()  # set while no transform is pending: the next batch may close
        self._work_idle.set()
        self.health = StageHealth(stage)
        self.watch = ConsumerWatch(self.health)
        self._stopping = threading.Event()
        self._consumer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-consumer")
        self._producer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-producer")
        self._work_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-work")
        self.consumer = None
        self.producer = None
        self._canary = None  # the last input record the transform passed (tells a broken stage from bad input)
        self.sizer = BatchSizer(config.batch.base_batch_docs, config.batch.max_batch_docs,
                                config.batch.target_batch_ms / 1000)

    # -- the loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(self._watch_stop(stop))
        try:
            if self.prepare is not None:
                self.health.not_ready("preparing (loading models or waiting for a snapshot)")
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
        backoff = Backoff(self.config.daemon.retry_backoff_max_s)
        while True:
            polling = None
            if not stop.is_set():
                polling = loop.run_in_executor(self._consumer_thread, self._poll_batch)
            # The batch in flight is committed as soon as its transform is done, while the next one is
            # still polled: a commit never waits out the next batch's max_wait_ms.
            finishing = None
            if in_flight is not None:
                finishing = asyncio.ensure_future(self._finish(loop, *in_flight))
            batch = await polling if polling is not None else None
            # Start the next transform before this commit is known: the model never waits on Kafka.
            next_flight = None
            if batch is not None and batch.records:
                metrics.BATCH_DOCUMENTS.labels(self.stage).observe(len(batch.records))
                metrics.INPUT_DOCUMENTS.labels(self.stage).inc(len(batch.records))
                next_flight = (batch, self._start_transform(loop, batch.records))
            if finishing is not None:
                if not await finishing:
                    if next_flight is not None:  # read again after the rewind
                        await asyncio.gather(next_flight[1], return_exceptions=True)
                        metrics.BATCHES_DROPPED.labels(self.stage, "retry").inc()
                        next_flight = None
                    self._invalidate()
                    await _sleep_or_stop(backoff.next(), stop)
                else:
                    backoff.reset()
                    self.completed = self._range_done(batch, next_flight)  # the last batch is committed
            else:
                self.completed = self._range_done(batch, next_flight)  # nothing (left) to read
            in_flight = next_flight
            if self.completed or (stop.is_set() and in_flight is None):
                return

    async def _finish(self, loop, batch: Batch, transformed: asyncio.Future) -> bool:
        """Wait for a batch's transform, then commit it (steps 3-5); False when it must be read again."""
        try:
            outputs = await transformed
        except StageFailure as exc:
            metrics.BATCH_RETRIES.labels(self.stage, "stage").inc()
            self.health.not_ready(f"failing: {exc}")
            log.error("%s: %s; the batch will be read again", self.stage, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a bug in the isolation itself: retried like a Kafka failure
            log.exception("%s: transforming a batch failed; it will be read again", self.stage)
            self.health.not_ready(f"failing: {type(exc).__name__}: {exc}")
            return False
        return await loop.run_in_executor(self._producer_thread, self._commit, batch, outputs)

    def _start_transform(self, loop, records: list) -> asyncio.Future:
        """`transform_isolated(records)` on the work thread; the work is idle again once every batch given to it
        is transformed (the consumer thread closes a batch only then, see `_poll_records`)."""
        with self._work_lock:
            self._transforms_pending += 1
            self._work_idle.clear()
        return loop.run_in_executor(self._work_thread, self._transform_counted, records)

    def _transform_counted(self, records: list) -> Outputs:
        try:
            return self.transform_isolated(records)
        finally:
            with self._work_lock:
                self._transforms_pending -= 1
                if not self._transforms_pending:
                    self._work_idle.set()

    def _invalidate(self, rewind: bool = True) -> None:
        """A new generation: every batch read before is dropped uncommitted, and (`rewind`, or the poll seeing
        the generation change) the consumer rewinds to the committed offsets before it reads on. Called
        from the consumer, producer and event-loop threads."""
        with self._generation_lock:
            self.generation += 1
            if rewind:
                self.rewind_needed = True

    def _range_done(self, batch: Batch | None, next_flight) -> bool:
        """A bounded run is complete when a poll found every partition at its end with nothing in flight."""
        return (batch is not None and batch.at_end and next_flight is None and not self.rewind_needed
                and batch.generation == self.generation)

    # -- work thread: the transform, one record at a time when it must ----------------------

    def transform_isolated(self, records: list) -> Outputs:
        """`transform(records)`, never failing for one record: see the module docstring."""
        started = time.perf_counter()
        outputs, failures = self._isolate(records, top=True)
        self.sizer.last_transform_s = time.perf_counter() - started
        metrics.TRANSFORM_SECONDS.labels(self.stage).observe(self.sizer.last_transform_s)
        if len(failures) == len(records) and self._canary is not None and self._canary_fails():
            raise StageFailure(f"every record of a batch of {len(records)} failed, and so does one that passed "
                               f"before ({failures[-1]})")
        for failure in failures:
            log.warning("%s: quarantined %s", self.stage, failure)
        return outputs

    def _canary_fails(self) -> bool:
        """Whether the last record that passed the transform fails now: then the stage is broken, not its input."""
        try:
            self._check_outputs(Outputs(self.transform([self._canary])))
        except Exception:  # noqa: BLE001 - any failure says the same
            return True
        return False

    def _isolate(self, records: list, top: bool = False) -> tuple[Outputs, list[str]]:
        """Outputs for `records`, splitting them until each failing record is alone; and what failed."""
        try:
            outputs = self.transform(records)
            if not isinstance(outputs, Outputs):
                outputs = Outputs(outputs)
            self._check_outputs(outputs)
            self._canary = records[-1]
            return outputs, []
        except Exception as exc:  # noqa: BLE001 - isolate the record that raises; the rest goes on
            if len(records) == 1:
                record = records[0]
                outputs = self._quarantine(record, exc)
                return outputs, [f"{record.topic}/{record.partition}/{record.offset} to the DLQ "
                                 f"({type(exc).__name__}: {exc})"]
            if top:
                metrics.BATCH_RETRIES.labels(self.stage, "split").inc()
                log.warning("%s: a batch of %d records failed (%s: %s); splitting it to isolate the record",
                            self.stage, len(records), type(exc).__name__, exc)
        mid = len(records) // 2
        left, left_failures = self._isolate(records[:mid])
        right, right_failures = self._isolate(records[mid:])
        return left.merge(right), left_failures + right_failures

    def _check_outputs(self, outputs: Outputs) -> None:
        """Raise for an output the producer would refuse, so that its record is isolated before any send."""
        limit = self.limits.output_record_bytes
        for out in outputs:
            if not isinstance(out.value, bytes) or not (out.key is None or isinstance(out.key, bytes)):
                raise InvalidDocument("unencodable", f"an output for {out.topic} is not bytes")
            size = record_size(out.value, out.key, out.headers)
            if size > limit:
                raise InvalidDocument("output_too_large", f"a {size}-byte record for {out.topic} exceeds the "
                                                          f"{limit}-byte limit (records.max_doc_bytes)")

    def _quarantine(self, record, exc: Exception) -> Outputs:
        """The DLQ entry of a record that failed alone."""
        if isinstance(exc, InvalidDocument):
            reason, detail = exc.reason, exc.detail
        else:
            reason, detail = "stage_error", f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__ if isinstance(exc, InvalidDocument) and exc.__cause__ is not None else exc
        outputs = Outputs()
        outputs.add_dlq(self.dlq_topic, self.stage, InvalidDocument(reason, detail), record,
                        self.limits.dlq_value_bytes, error=type(cause).__name__, fmt=self.config.output.format)
        return outputs

    # -- consumer thread -------------------------------------------------------------

    def _poll_batch(self) -> Batch:
        try:
            return self._poll_records()
        except Exception as exc:  # noqa: BLE001 - the broker is away (rewind, positions): retried
            self.health.broker_failed(f"broker unreachable: {type(exc).__name__}: {exc}")
            log.warning("%s: reading failed (%s: %s); retrying", self.stage, type(exc).__name__, exc)
            self.rewind_needed = True
            self._stopping.wait(1.0)
            return Batch([], self.generation, None)

    def _poll_records(self) -> Batch:
        if self.consumer is None:  # its replacement failed to start: raises until the broker answers
            self._make_consumer()
        consumer = self.consumer
        records: list = []
        generation = self.generation
        started = time.monotonic()
        deadline = started + self.config.batch.max_wait_ms / 1000
        # With nothing to read, an empty batch comes back this often (stop, health probes, a range's
        # end); a record ends the wait at once. Not max_wait_ms: at 20 ms an idle `run` woke ~1200 times
        # a second and took 9% of a core, against 2% at 200 (bench/RESULTS.md, "Latency at a steady load").
        give_up = max(deadline, started + IDLE_POLL_S)
        limit, max_bytes = self.sizer.size, self.config.batch.max_batch_bytes
        size_bytes = 0
        while len(records) < limit and size_bytes < max_bytes and not self._stopping.is_set():
            if self.rewind_needed or self.generation != generation:
                # A failed transaction or a rebalance: everything not committed is read again.
                self._rewind()
                records, generation, size_bytes = [], self.generation, 0
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if records and remaining_ms == 0:
                # Past max_wait_ms with records in hand: the batch closes once the work thread is free to take
                # it, and until then takes what arrives, so a record waits for the transform before it, never
                # for one more batch after it.
                if self._work_idle.wait(WORK_WAIT_S):
                    break
                timeout_ms = 0
            else:
                timeout_ms = min(remaining_ms, 200) if records else max(0, int((give_up - time.monotonic()) * 1000))
            polled = consumer.poll(timeout_ms=timeout_ms, max_records=limit - len(records))
            if self.generation != generation:
                continue  # rebalanced inside poll: drop what came with it, rewind, start afresh
            for tp, part in polled.items():
                if self.bounds is not None:
                    end = self.bounds.end[tp]
                    part = [r for r in part if r.offset < end]  # past the range: never read
                records.extend(part)
                size_bytes += sum(r.serialized_value_size for r in part)
            if self.bounds is not None and self._pause_finished():
                break
            if not records and time.monotonic() >= give_up:
                break  # nothing came
        if records:
            self.watch.got_records(records)
            self.sizer.observe(len(records), filled=len(records) >= limit or size_bytes >= max_bytes)
        if self.watch.probe(consumer, skip=consumer.paused()):
            self._recreate_consumer()
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

    def _recreate_consumer(self) -> None:
        """A stalled consumer is replaced; that counts as a rebalance: in-flight batches are dropped
        and everything uncommitted is read again, so nothing is lost or duplicated. Should the new
        one fail to start (the broker away), the next poll makes it."""
        metrics.RETRIES.labels(self.stage).inc()
        self._invalidate()
        self.watch.reset()
        old, self.consumer = self.consumer, None
        try:
            old.close(autocommit=False)
        except Exception:  # noqa: BLE001 - replaced either way
            pass
        self._make_consumer()

    def _rewind(self) -> None:
        # Cleared first: a batch the producer thread drops meanwhile (`_invalidate`) asks for one more rewind.
        self.rewind_needed = False
        for tp in self.consumer.assignment():
            # Fetched as stable offsets (read_committed): waits while a transaction's offsets are pending.
            committed = self.consumer.committed(tp, timeout_ms=self.txn_wait_ms)
            if committed is not None:
                self.consumer.seek(tp, committed)
            elif self.bounds is not None:
                self.consumer.seek(tp, self.bounds.start[tp])
            else:
                self.consumer.seek_to_beginning(tp)
        if self.bounds is not None:
            self.consumer.resume(*self.consumer.paused())  # `_pause_finished` pauses them again at their end

    # -- producer thread ---------------------------------------------------------------

    def _commit(self, batch: Batch, outputs: list[Output], splittable: bool = True) -> bool:
        """Steps 3–5 of the checkpoint. True when committed (or dropped after a rebalance); False when
        the broker failed it (to be read again after a backoff). A transaction refused for what it
        carries is split (`_commit_split`) unless `splittable` is False (a quarantine entry itself)."""
        if batch.generation != self.generation:
            metrics.BATCHES_DROPPED.labels(self.stage, "rebalance").inc()
            log.info("%s: dropping a batch of %d read before a rebalance", self.stage, len(batch.records))
            return True  # nothing to retry: the new owner reads these offsets again
        if self._out_of_group(batch):
            # The broker could not fence this commit: drop it, like a rebalance, and read again once rejoined.
            metrics.BATCHES_DROPPED.labels(self.stage, "rebalance").inc()
            log.warning("%s: dropping a batch of %d read by a member that has left the group; it rejoins and "
                        "reads again from the committed offsets", self.stage, len(batch.records))
            self._invalidate()
            return True
        try:
            self._produce(batch, outputs)
        except Exception as exc:  # noqa: BLE001 - every failure aborts the batch and replaces the producer
            metrics.TRANSACTIONS.labels(self.stage, "abort").inc()
            self._replace_producer()
            if splittable and is_record_failure(exc):
                return self._commit_split(batch, exc)
            metrics.RETRIES.labels(self.stage).inc()
            metrics.BATCH_RETRIES.labels(self.stage, "broker").inc()
            self.health.broker_failed(f"transaction failed: {type(exc).__name__}: {exc}")
            log.warning("%s: transaction for %d records aborted (%s: %s); retrying from committed offsets",
                        self.stage, len(batch.records), type(exc).__name__, exc)
            return False
        metrics.TRANSACTIONS.labels(self.stage, "commit").inc()
        if log.isEnabledFor(logging.DEBUG):
            meta = batch.group_metadata
            log.debug("%s: committed %d records, %s (generation %s, member %s)", self.stage, len(batch.records),
                      ", ".join(f"{tp.topic}[{tp.partition}] to {o.offset}" for tp, o in batch.next_offsets().items()),
                      getattr(meta, "generation_id", None), getattr(meta, "member_id", None) or "none")
        if isinstance(outputs, Outputs):
            outputs.apply()
        self.health.broker_ok()
        self.health.progressing()
        metrics.BATCH_SECONDS.labels(self.stage).observe(time.monotonic() - batch.polled_at)
        if self.on_commit is not None:
            self.on_commit(batch, outputs)
        return True

    def _out_of_group(self, batch: Batch) -> bool:
        """Whether a group member's batch was stamped after the member fell out of the group. kafka-python
        then reports generation -1 and no member id until it rejoins, and the broker takes a
        TxnOffsetCommit carrying those as one from a client older than KIP-447, without fencing it,
        while the partitions' new owner reads the same records again. (A bounded run is assigned its
        partitions, never a member: it always commits so.)"""
        meta = batch.group_metadata
        return self.bounds is None and (meta is None or meta.generation_id < 0 or not meta.member_id)

    def _produce(self, batch: Batch, outputs: list[Output]) -> None:
        from kafka.errors import IllegalStateError, KafkaConnectionError

        producer = self.producer
        if producer is None:
            raise KafkaConnectionError("no transactional producer (the broker was unreachable)")
        if pending_offsets(producer):  # never after a fresh init_transactions; checked all the same
            raise IllegalStateError("the producer holds offsets of an earlier transaction")
        producer.begin_transaction()
        futures = [producer.send(out.topic, value=out.value, key=out.key, headers=list(out.headers))
                   for out in outputs]
        try:
            send_offsets(producer, batch.next_offsets(self.bounds.metadata if self.bounds else None),
                         batch.group_metadata, self.txn_wait_ms)
            if self.config.daemon.crash_before_commit and random.random() < self.config.daemon.crash_before_commit:
                log.warning("%s: daemon.crash_before_commit: killing the process before commit", self.stage)
                os.kill(os.getpid(), signal.SIGKILL)
            end_transaction(producer, True, self.txn_wait_ms)
        except Exception as exc:
            refused = next((f.exception for f in futures if f.is_done and f.failed()
                            and is_record_failure(f.exception)), None)
            if refused is not None:  # what the broker refused, not what the commit then said
                raise refused from exc
            raise

    def _commit_split(self, batch: Batch, exc: Exception) -> bool:
        """A transaction refused for what it carried: commit each half alone; a single record goes to the DLQ."""
        if len(batch.records) == 1:
            record = batch.records[0]
            reason = "output_too_large" if "TooLarge" in type(exc).__name__ else "stage_error"
            log.warning("%s: quarantined %s/%d/%d to the DLQ (%s: %s)", self.stage, record.topic, record.partition,
                        record.offset, type(exc).__name__, exc)
            # The DLQ copy is cut to records.max_doc_bytes, which every output topic was checked to hold;
            # should the broker refuse even that, it is retried like a broker failure, never split again.
            outputs = self._quarantine(record, InvalidDocument(reason, f"{type(exc).__name__}: {exc}"))
            return self._commit(batch, outputs, splittable=False)
        metrics.BATCH_RETRIES.labels(self.stage, "split").inc()
        log.warning("%s: a transaction of %d records was refused (%s: %s); committing it in halves",
                    self.stage, len(batch.records), type(exc).__name__, exc)
        for half in batch.halves():
            try:
                outputs = self.transform_isolated(half.records)
            except StageFailure as failure:
                self.health.not_ready(f"failing: {failure}")
                return False
            if not self._commit(half, outputs):
                return False
        return True

    def _replace_producer(self) -> None:
        """Close the producer and start a new one (same transactional id), retrying while the broker is away."""
        if self.producer is not None:
            try:
                self.producer.close(timeout=1)
            except Exception:  # noqa: BLE001 - discarded either way
                pass
        self.producer = None
        backoff = Backoff(self.config.daemon.retry_backoff_max_s)
        while not self._stopping.is_set():
            try:
                self.producer = new_transactional_producer(self.config, self.transactional_id)
                return
            except Exception as exc:  # noqa: BLE001
                metrics.RETRIES.labels(self.stage).inc()
                self.health.broker_failed(f"cannot start a transactional producer: {type(exc).__name__}: {exc}")
                log.warning("%s: cannot start a transactional producer yet (%s); retrying", self.stage, exc)
                self._stopping.wait(backoff.next())

    # -- set-up and tear-down -------------------------------------------------------------

    async def _connect(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self.config.daemon.retry_backoff_max_s)
        self.health.not_ready(f"connecting to Kafka at {self.config.kafka.bootstrap_servers}")
        while not stop.is_set():
            try:
                await loop.run_in_executor(self._producer_thread, self._make_producer)
                await loop.run_in_executor(self._consumer_thread, self._make_consumer)
                self.health.broker_ok()
                self.health.progressing()
                log.info("%s: consuming %s as group %s (transactional id %s)", self.stage, self.input_topic,
                         self.group, self.transactional_id)
                return
            except Exception as exc:  # noqa: BLE001 - broker not reachable yet
                metrics.RETRIES.labels(self.stage).inc()
                delay = backoff.next()
                self.health.broker_failed(f"cannot reach Kafka at {self.config.kafka.bootstrap_servers}: "
                                          f"{type(exc).__name__}: {exc}")
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
                loop_self._invalidate(rewind=False)  # in-flight batches of the old generation are dropped
                forget_lag(loop_self.stage, revoked)
                if revoked:
                    log.info("%s: revoked %s (%s)", loop_self.stage, _partitions(revoked), loop_self._membership())

            def on_partitions_lost(self, lost):
                log.warning("%s: lost %s: this member is out of the group (session expired or poll timeout); "
                            "in-flight batches are dropped", loop_self.stage, _partitions(lost))
                self.on_partitions_revoked(lost)

            def on_partitions_assigned(self, assigned):
                # kafka-python keeps the position of a partition that comes back in an eager rebalance;
                # another member may have committed past it in a generation this one missed. So a new
                # assignment is a new generation too: the loop rewinds to the committed offsets.
                loop_self._invalidate(rewind=False)
                log.info("%s: assigned %s (%s)", loop_self.stage, _partitions(assigned) or "nothing",
                         loop_self._membership())

        if self.consumer is None and self.bounds is not None:
            # A bounded run owns its group alone: assigned, not subscribed, so a restart after a
            # kill resumes at once instead of waiting out the dead member's session.
            self.consumer = new_consumer(self.config, self.group)
            self.consumer.assign(sorted(self.bounds.end, key=lambda tp: tp.partition))
            self._rewind()
        elif self.consumer is None:
            consumer = new_consumer(self.config, self.group)
            consumer.subscribe([self.input_topic], listener=Listener())
            # Join with the topic's metadata in hand, fetched after subscribing so that the group
            # coordinator sees it too: a leader that assigns before then assigns no partitions (or
            # kafka-python does not revisit them) and rebalances again at once, aborting the
            # transaction it has in flight (tests/daemon/test_group_rejoin.py).
            deadline = time.monotonic() + 30
            while self.input_topic not in consumer.topics():  # a fresh metadata fetch, every time
                if time.monotonic() > deadline:
                    consumer.close()
                    raise RuntimeError(f"topic {self.input_topic} has no partitions (does it exist?)")
                time.sleep(0.5)
            self.consumer = consumer

    def _membership(self) -> str:
        """The consumer's group generation and member id, for log lines."""
        try:
            meta = self.consumer.group_metadata()
            return f"generation {meta.generation_id}, member {meta.member_id or 'none'}"
        except Exception:  # noqa: BLE001 - a log line's detail
            return "generation unknown"

    def _close(self) -> None:
        self.health.not_ready("stopped")
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


def _partitions(tps) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


async def back_off_and_reconnect(stage: str, executor, reconnect: Callable[[], None], backoff: Backoff,
                                 stop: asyncio.Event) -> None:
    """After a failed step of a non-transactional stage (sketch, sink): count the retry, back off, and
    `reconnect` on `executor`; a reconnect that fails too is logged and left to the next failure."""
    metrics.RETRIES.labels(stage).inc()
    await _sleep_or_stop(backoff.next(), stop)
    try:
        await asyncio.get_running_loop().run_in_executor(executor, reconnect)
    except Exception as exc:  # noqa: BLE001 - the broker is still away: the next step fails and retries
        log.warning("%s: reconnecting failed (%s); will retry", stage, exc)


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
