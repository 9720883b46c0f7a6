"""The sketch aggregator: `crawl.scored` → `SketchState` → snapshots that carry the offsets they cover."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from streamfilter import metrics
from streamfilter.config import Config, build_policy
from streamfilter.errors import InvalidDocument
from streamfilter.kafka_clients import Backoff, ConsumerWatch, StageHealth, close_quietly, new_consumer
from streamfilter.kafka_loop import IDLE_POLL_S, _sleep_or_stop, back_off_and_reconnect
from streamfilter.records import decode_scored

log = logging.getLogger("streamfilter.stages")


class SketchAggregator:
    """Consumes `crawl.scored` into a `SketchState`; snapshots carry the offsets they cover.

    Exactly-once counting does not need Kafka transactions here: the snapshot is the
    checkpoint. On start the newest valid snapshot is loaded and the consumer seeks to its
    offsets; documents counted after it are counted again from there after a crash, and
    never twice. Offsets are also committed to the group after each snapshot, for lag only.

    Cadence: the first snapshot is written as soon as the state covers `route.min_snapshot_docs`
    documents (the route cannot decide before it has one), then one every `snapshot_interval_s`
    while new documents arrive. `handoff` (`run`) hands each written snapshot to the route of
    the same process.
    """

    stage = "sketch"

    def __init__(self, config: Config, handoff=None):
        from streamfilter.stages.store import open_store

        self.config = config
        self.store = open_store(config)
        self.policy = build_policy(config)
        self.state = None
        self.consumer = None
        self._dirty = False
        self._usable_written = False  # a snapshot with >= route.min_snapshot_docs documents exists
        self.handoff = handoff  # density.snapshot_store.SnapshotHandoff, or None
        self.health = StageHealth(self.stage)
        self.watch = ConsumerWatch(self.health)
        self._stopping = threading.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sketch")

    def restore(self) -> None:
        from streamfilter.density.state import SketchState

        snapshot = self.store.latest()
        if snapshot is not None:
            self.state = SketchState.restore(snapshot, policies=[self.policy])
            self._usable_written = snapshot.doc_count >= self.config.route.min_snapshot_docs
            metrics.SNAPSHOT_TIMESTAMP.labels(self.stage).set(snapshot.created_at)
            metrics.SKETCH_DOCUMENTS.set(self.state.doc_count)
            log.info("sketch: restored snapshot %s (%d documents)", snapshot.snapshot_id, snapshot.doc_count)

    def _new_state(self, dim: int):
        from streamfilter.density import race, reservoir
        from streamfilter.density.state import SketchState

        s = self.config.sketch
        return SketchState.create(
            dim, rows=s.rows, buckets=s.buckets, k=s.k or race.DEFAULT_K, width=s.width or None,  # None: calibrate
            seed=s.hash_seed, policy_seed=self.config.policy.seed, leave_one_out=s.leave_one_out,
            calibration_docs=s.calibration_docs,
            reservoir_size=s.reservoir_size or reservoir.DEFAULT_RESERVOIR_SIZE, policies=[self.policy])

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(self._watch(stop))
        try:
            await loop.run_in_executor(self._thread, self.restore)
            backoff = Backoff(self.config.daemon.retry_backoff_max_s)
            self.health.not_ready(f"connecting to Kafka at {self.config.kafka.bootstrap_servers}")
            while not stop.is_set():
                try:
                    await loop.run_in_executor(self._thread, self._connect)
                    break
                except Exception as exc:  # noqa: BLE001 - broker not reachable yet
                    self.health.broker_failed(f"cannot reach Kafka at {self.config.kafka.bootstrap_servers}: "
                                              f"{type(exc).__name__}: {exc}")
                    log.warning("sketch: cannot reach Kafka (%s); retrying", exc)
                    await _sleep_or_stop(backoff.next(), stop)
            self.health.progressing()
            last_snapshot = time.monotonic()
            while not stop.is_set():
                try:
                    await loop.run_in_executor(self._thread, self._poll_and_count)
                    if self.snapshot_due(time.monotonic() - last_snapshot):
                        await loop.run_in_executor(self._thread, self.write_snapshot)
                        last_snapshot = time.monotonic()
                    backoff.reset()
                except Exception as exc:  # noqa: BLE001 - keep counting: reconnect and seek to the covered offsets
                    log.exception("sketch: consuming failed; reconnecting")
                    self.health.broker_failed(f"consuming failed: {type(exc).__name__}: {exc}")
                    await back_off_and_reconnect(self.stage, self._thread, self._reconnect, backoff, stop)
            if self._dirty:
                await loop.run_in_executor(self._thread, self.write_snapshot)
        finally:
            watcher.cancel()
            self.health.not_ready("stopped")
            if self.consumer is not None:
                await loop.run_in_executor(self._thread, self.consumer.close)
            self._thread.shutdown(wait=False)

    def snapshot_due(self, since_last_s: float) -> bool:
        """Whether to write a snapshot now: on the interval while new documents arrive, and at once
        when the state first reaches `route.min_snapshot_docs` documents (the route is waiting)."""
        if not self._dirty or self.state is None:
            return False
        if not self._usable_written and self.state.doc_count >= self.config.route.min_snapshot_docs:
            return True
        return since_last_s >= self.config.sketch.snapshot_interval_s

    async def _watch(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping.set()

    def _connect(self) -> None:
        from kafka.structs import TopicPartition

        consumer = new_consumer(self.config, self.config.group(self.stage))
        topic = self.config.topics.scored
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            consumer.close()
            raise RuntimeError(f"topic {topic} has no partitions yet")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        offsets = self.state.offsets if self.state is not None else {}
        for tp in tps:
            if (tp.topic, tp.partition) in offsets:
                consumer.seek(tp, offsets[(tp.topic, tp.partition)])
            else:
                consumer.seek_to_beginning(tp)
        self.consumer = consumer
        self.watch.reset()
        self.health.broker_ok()

    def _reconnect(self) -> None:
        close_quietly(self.consumer)
        self.consumer = None
        self._connect()

    def _poll_and_count(self) -> None:
        polled = self.consumer.poll(timeout_ms=int(IDLE_POLL_S * 1000),
                                    max_records=self.config.batch.max_batch_docs)
        records = [r for part in polled.values() for r in part]
        if records:
            self.watch.got_records()
        if self.watch.probe(self.consumer):  # broker health, lag, stall
            self._reconnect()
            return
        if not records:
            return
        metrics.INPUT_DOCUMENTS.labels(self.stage).inc(len(records))
        ids, embeddings, askllm, coords, nll = [], [], [], [], []
        dim = self.state.dim if self.state is not None else None
        for record in records:
            try:
                scored = decode_scored(record.value)
            except InvalidDocument as exc:
                # The route stage sends these to the DLQ; the sketch only moves past them.
                log.warning("sketch: skipping %s/%d/%d: %s", record.topic, record.partition, record.offset, exc)
                metrics.DOCUMENTS.labels(self.stage, "skipped").inc()
                continue
            if dim is None:
                dim = scored.embedding.shape[0]
            problem = (f"a {scored.embedding.shape[0]}-dimensional embedding in a {dim}-dimensional sketch"
                       if scored.embedding.shape[0] != dim else
                       "a non-finite embedding or Ask-LLM score"
                       if not (np.isfinite(scored.embedding).all() and math.isfinite(scored.askllm)) else None)
            if problem:  # one record must not stop the aggregator: skipped, like an undecodable one
                log.warning("sketch: skipping %s/%d/%d: %s", record.topic, record.partition, record.offset, problem)
                metrics.DOCUMENTS.labels(self.stage, "skipped").inc()
                continue
            ids.append(scored.document.id)
            embeddings.append(scored.embedding)
            askllm.append(scored.askllm)
            nll.append(np.nan if scored.perplexity is None else scored.perplexity)
            coords.append((record.topic, record.partition, record.offset))
        if ids:
            emb = np.stack(embeddings).astype(np.float32)
            if self.state is None:
                self.state = self._new_state(emb.shape[1])
            added = self.state.on_batch(ids, emb, np.asarray(askllm), coords, perplexity=np.asarray(nll, dtype=np.float64))
            metrics.DOCUMENTS.labels(self.stage, "counted").inc(added)
            metrics.SKETCH_DOCUMENTS.set(self.state.doc_count)
            self._dirty = True
        # Skipped records still advance the covered offsets, so a restart does not revisit them.
        if self.state is not None:
            for record in records:
                key = (record.topic, record.partition)
                self.state.offsets[key] = max(self.state.offsets.get(key, 0), record.offset + 1)

    def write_snapshot(self) -> None:
        if self.state is None:
            return
        snapshot = self.state.snapshot()
        path = self.store.write(snapshot)
        self._dirty = False
        if snapshot.doc_count >= self.config.route.min_snapshot_docs:
            self._usable_written = True
        if self.handoff is not None:
            self.handoff.publish(path, snapshot)
        metrics.SNAPSHOTS_WRITTEN.inc()
        metrics.SNAPSHOT_TIMESTAMP.labels(self.stage).set(snapshot.created_at)
        log.info("sketch: wrote snapshot %s (%d documents) to %s", snapshot.snapshot_id, snapshot.doc_count, path)
        self._commit_for_lag(snapshot.offsets)

    def _commit_for_lag(self, offsets: dict) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        try:
            # Bounded: an unbounded commit held the aggregator for as long as the broker was away.
            self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
                                 timeout_ms=2_000)
        except Exception as exc:  # noqa: BLE001 - informational only: the snapshot is the checkpoint
            log.debug("sketch: committing offsets for lag monitoring failed: %s", exc)
