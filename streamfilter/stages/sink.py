"""The sink: the accepted topic (read_committed) → training-ready shards, Parquet or JSON lines (zstd).

Exactly once without Kafka transactions, by construction (`streamfilter.shards`): a shard's name
states the partition and the offsets `[start, end)` it holds, it becomes visible only whole, and
the names are the checkpoint. Per partition the sink keeps a cursor, the end of its last visible
shard; a new shard always starts at the cursor, so shards never overlap, and the cursor moves
only once a shard holding every committed record below its new value is visible, so there is
never a hole. On start (and after any failure) the directory is listed again, temporary files
left by a killed sink are removed, and the consumer seeks each partition to its cursor; records
read into shards not yet written are simply read again. Offsets are committed to the group
`PREFIX.sink` after each shard, for lag monitoring only.

One process owns a topic's shards in one directory: it assigns itself every partition of the
topic (no group membership, no rebalances), like the sketch aggregator. Two sinks writing the
same directory would write overlapping shards.

A record that does not decode (only the route writes this topic, and it sends bad input to the
DLQ) is skipped with a log line naming its coordinates and `streamfilter_documents_total{stage="sink",
outcome="skipped"}`; its offset stays inside the shard's range, so the ranges still tile.

`sink.until_end` (`streamfilter sink --until-end`): the end offsets are fixed when the sink starts
(the last stable offsets), each partition stops there, and once all have, the last shards are
written, then the `_SUCCESS-...json` manifest of the range, and `run` returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from streamfilter import metrics
from streamfilter.config import Config
from streamfilter.errors import UserError
from streamfilter.kafka_clients import Backoff, ConsumerWatch, StageHealth, close_quietly, new_consumer
from streamfilter.kafka_loop import IDLE_POLL_S, _sleep_or_stop, back_off_and_reconnect

log = logging.getLogger("streamfilter.stages")

PARTITION_CHECK_S = 30.0  # how often the sink looks for partitions added to its topic


def check_requirements(config: Config) -> None:
    """One line, at start-up, for what would otherwise fail on every retry: a missing extra, a bad URL."""
    import importlib.util

    needed = ["fsspec", "zstandard"] + (["pyarrow"] if config.sink.format == "parquet" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"sink.format {config.sink.format!r} needs {', '.join(missing)}: "
                        "pip install 'streamfilter[sink]'")
    import fsspec

    try:
        fsspec.core.url_to_fs(config.sink.path)
    except (ValueError, ImportError) as exc:
        raise UserError(f"sink.path {config.sink.path!r}: {exc}") from None


class ShardSink:
    """Consumes one topic into rolling shards per partition; see the module docstring."""

    stage = "sink"

    def __init__(self, config: Config):
        check_requirements(config)
        self.config = config
        self.settings = config.sink
        self.topic = config.sink.topic or config.topics.accepted
        self.format = config.sink.format
        self.until_end = config.sink.until_end
        self.store = None  # shards.ShardStore, opened on the worker thread (a remote filesystem may block)
        self.consumer = None
        self.cursor: dict[int, int] = {}  # partition -> end of its last visible shard (where the next one starts)
        self.open: dict[int, object] = {}  # partition -> shards.ShardRows in the making
        self.ends: dict[int, int] | None = None  # until_end: the fixed end offsets
        self.finished: set[int] = set()  # until_end: partitions that reached their end
        self.done = False
        self.written: dict[str, tuple[int, str]] = {}  # shards written by this process: name -> (rows, sha256)
        self.manifest: str | None = None
        self.health = StageHealth(self.stage)
        self.watch = ConsumerWatch(self.health)
        self._partitions_checked = 0.0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sink")

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        try:
            backoff = Backoff(self.config.daemon.retry_backoff_max_s)
            self.health.not_ready(f"connecting to Kafka at {self.config.kafka.bootstrap_servers}")
            while not stop.is_set():
                try:
                    await loop.run_in_executor(self._thread, self._connect)
                    break
                except Exception as exc:  # noqa: BLE001 - broker or filesystem not reachable yet
                    self.health.broker_failed(f"cannot start: {type(exc).__name__}: {exc}")
                    log.warning("sink: cannot start (%s); retrying", exc)
                    await _sleep_or_stop(backoff.next(), stop)
            self.health.progressing()
            while not stop.is_set() and not self.done:
                try:
                    await loop.run_in_executor(self._thread, self.step)
                    backoff.reset()
                except Exception as exc:  # noqa: BLE001 - drop the shards in flight, list again, read again
                    log.exception("sink: consuming or writing failed; resuming from the shards written")
                    self.health.not_ready(f"failed: {type(exc).__name__}: {exc}")
                    await back_off_and_reconnect(self.stage, self._thread, self._reconnect, backoff, stop)
            if not self.done and self.consumer is not None and self.open:
                try:  # a clean stop writes what it holds: those records need not be read again
                    await loop.run_in_executor(self._thread, self.flush)
                except Exception:  # noqa: BLE001 - not written: read again by the next start
                    log.exception("sink: writing the last shards on shutdown failed")
        finally:
            self.health.not_ready("finished" if self.done else "stopped")
            if self.consumer is not None:
                await loop.run_in_executor(self._thread, self.consumer.close)
            self._thread.shutdown(wait=False)

    # -- connecting ----------------------------------------------------------------------------

    def _connect(self) -> None:
        from kafka.structs import TopicPartition

        from streamfilter.shards import ShardStore

        if self.store is None:
            self.store = ShardStore(self.settings.path)
        scan = self.store.scan(self.topic, self.format)
        for name in scan.removed:
            log.info("sink: removed %s (left by an interrupted write)", name)
        consumer = new_consumer(self.config, self.config.group(self.stage))
        try:
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                raise RuntimeError(f"topic {self.topic} has no partitions yet")
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            beginning = consumer.beginning_offsets(tps, timeout_ms=10_000)
            if self.until_end and self.ends is None:
                # read_committed: the last stable offsets, so an open upstream transaction is not waited for
                self.ends = {tp.partition: end for tp, end in consumer.end_offsets(tps, timeout_ms=10_000).items()}
            self.cursor = {}
            for tp in tps:
                start = scan.resume.get(tp.partition)
                if start is None or start < beginning[tp]:
                    if start is not None:
                        log.warning("sink: %s[%d] records %d..%d were deleted (retention) before the sink wrote "
                                    "them", self.topic, tp.partition, start, beginning[tp] - 1)
                    start = beginning[tp]
                consumer.seek(tp, start)
                self.cursor[tp.partition] = start
            if self.ends is not None:
                self.finished = {p for p, start in self.cursor.items() if start >= self.ends.get(p, 0)}
                paused = [tp for tp in tps if tp.partition in self.finished]
                if paused:
                    consumer.pause(*paused)
        except BaseException:
            consumer.close()
            raise
        self.open = {}
        self.consumer = consumer
        self._partitions_checked = time.monotonic()
        self.watch.reset()
        self.health.broker_ok()
        log.info("sink: %s → %s (%s), resuming at %s", self.topic, self.settings.path, self.format,
                 ", ".join(f"p{p}@{o}" for p, o in sorted(self.cursor.items())))

    def _reconnect(self) -> None:
        close_quietly(self.consumer)
        self.consumer = None
        self.open = {}
        self._connect()

    # -- consuming -----------------------------------------------------------------------------

    def step(self) -> None:
        """One poll: add the records to their partitions' shards, write the shards that are due."""
        polled = self.consumer.poll(timeout_ms=int(IDLE_POLL_S * 1000),
                                    max_records=self.config.batch.max_batch_docs)
        count = 0
        for tp, records in polled.items():
            if self.ends is not None:
                records = [r for r in records if r.offset < self.ends.get(tp.partition, 0)]
            count += len(records)
            self._add(tp.partition, records)
        if count:
            metrics.INPUT_DOCUMENTS.labels(self.stage).inc(count)
            self.watch.got_records()
            self.health.progressing()
        if self.watch.probe(self.consumer, skip=self._paused()):  # broker health, lag, stall
            self._reconnect()
            return
        now = time.monotonic()
        for partition, rows in list(self.open.items()):
            if (rows.value_bytes >= self.settings.shard_max_bytes
                    or now - rows.opened_at >= self.settings.roll_interval_s):
                self.write(partition)
        if self.ends is not None:
            self._check_finished()
        elif now - self._partitions_checked >= PARTITION_CHECK_S:
            self._partitions_checked = now
            partitions = self.consumer.partitions_for_topic(self.topic) or set()
            if set(partitions) - set(self.cursor):
                log.info("sink: %s has new partitions; reassigning", self.topic)
                self.flush()
                self._reconnect()

    def _add(self, partition: int, records: list) -> None:
        from streamfilter.shards import ShardRows

        max_docs = self.settings.shard_max_docs
        while records:
            rows = self.open.get(partition)
            if rows is None:
                rows = self.open[partition] = ShardRows(self.topic, partition, self.cursor[partition],
                                                        self.config.records.max_doc_bytes)
            room = max_docs - rows.records
            rows.add(records[:room])
            records = records[room:]
            if rows.records >= max_docs:
                self.write(partition)

    def _paused(self) -> set:
        from kafka.structs import TopicPartition

        return {TopicPartition(self.topic, p) for p in self.finished}

    def _check_finished(self) -> None:
        from kafka.structs import TopicPartition

        for partition, end in self.ends.items():
            if partition in self.finished or partition not in self.cursor:
                continue
            tp = TopicPartition(self.topic, partition)
            if self.consumer.position(tp, timeout_ms=5_000) >= end:
                self.finished.add(partition)
                self.consumer.pause(tp)
        if self.finished >= set(self.cursor):
            self.flush()
            self.write_manifest()
            self.done = True

    # -- writing -------------------------------------------------------------------------------

    def write(self, partition: int) -> None:
        """Encode, publish and account for `partition`'s open shard; only then move its cursor."""
        from streamfilter.shards import ENCODERS

        rows = self.open.pop(partition)
        started = time.monotonic()
        data = ENCODERS[self.format](rows, self.settings.compression_level)
        name = rows.shard_name(self.format).name
        self.store.publish(name, data, before_visible=self._maybe_crash)
        self.cursor[partition] = rows.end
        metrics.SINK_SHARD_SECONDS.labels(self.format).observe(time.monotonic() - started)
        metrics.SINK_SHARDS.labels(self.format).inc()
        metrics.DOCUMENTS.labels(self.stage, "written").inc(len(rows))
        if rows.skipped:
            metrics.DOCUMENTS.labels(self.stage, "skipped").inc(rows.skipped)
        if self.until_end:
            self.written[name] = (len(rows), hashlib.sha256(data).hexdigest())
        log.info("sink: wrote %s (%d documents, %d bytes)", name, len(rows), len(data))
        self._commit_for_lag(partition, rows.end)

    def _maybe_crash(self) -> None:
        chance = self.config.daemon.crash_before_commit
        if chance and random.random() < chance:
            log.warning("sink: daemon.crash_before_commit: killing the process before a shard becomes visible")
            os.kill(os.getpid(), signal.SIGKILL)

    def flush(self) -> None:
        """Write every open shard (on a clean stop, at the end of a one-shot range, before reassigning)."""
        for partition in list(self.open):
            self.write(partition)

    def write_manifest(self) -> None:
        from streamfilter.shards import build_manifest, write_manifest

        manifest = build_manifest(self.store, self.topic, self.format, self.ends, known=self.written)
        self.manifest = write_manifest(self.store, manifest)
        log.info("sink: range complete: %d documents in %d shards; wrote %s", manifest["rows"],
                 len(manifest["shards"]), self.manifest)

    def _commit_for_lag(self, partition: int, offset: int) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        try:
            self.consumer.commit({TopicPartition(self.topic, partition): OffsetAndMetadata(offset, "", -1)},
                                 timeout_ms=2_000)
        except Exception as exc:  # noqa: BLE001 - informational only: the shard names are the checkpoint
            log.debug("sink: committing offsets for lag monitoring failed: %s", exc)
