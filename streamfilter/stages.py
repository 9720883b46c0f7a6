"""The three stages of the flow: score (pass 1), sketch (the aggregator), route (pass 2).

`ScoreTransform` and `RouteTransform` map a micro-batch of Kafka records to output
records and run inside `kafka_loop.TransactionalLoop`; `SketchAggregator` consumes
`crawl.scored` into a `SketchState` and writes snapshots that carry the offsets they
cover. The scoring, the sketch and the policy themselves live in `streamfilter.models` and
`streamfilter.density`; this module only wires records to them.
"""

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
from streamfilter.kafka_loop import Output, Outputs, _Backoff, _sleep_or_stop, broker_connected, new_consumer
from streamfilter.records import (
    Document, ScoredRecord, decode_raw, decode_scored, dlq_headers, encode_document, encode_scored,
)

log = logging.getLogger(__name__)


def add_dlq_output(outputs: Outputs, config: Config, stage: str, exc: InvalidDocument, record) -> None:
    """Append the DLQ entry for `record` (original bytes, reason headers) and count it on commit."""
    outputs.count(metrics.DLQ, (stage, exc.reason))
    outputs.count(metrics.DOCUMENTS, (stage, "dlq"))
    outputs.append(Output(config.topics.dlq, record.value if record.value is not None else b"", key=record.key,
                          headers=dlq_headers(exc, stage, record.topic, record.partition, record.offset)))


class ScoreTransform:
    """Pass 1: raw records → scored records (Ask-LLM P(yes) + float16 embedding) or DLQ entries."""

    stage = "score"

    def __init__(self, config: Config, scorer=None, embedder=None, perplexity=None):
        self.config = config
        self.scorer = scorer  # AskLLMScorer-like: score(texts, batch_size) -> [n] P(yes); model_id
        self.embedder = embedder  # SentenceEmbedder-like: embed(texts, batch_size) -> [n, dim]; model_id, dim
        self.perplexity = perplexity  # optional PerplexityScorer-like: score(texts, batch_size) -> [n] mean NLL

    def load(self) -> None:
        """Load the configured models (unless models were given to the constructor)."""
        if self.scorer is not None and self.embedder is not None:
            return
        from streamfilter.models import AskLLMScorer, SentenceEmbedder

        m = self.config.models
        variant = None if m.variant == "auto" else m.variant
        threads = m.intra_op_threads or None
        self.scorer = AskLLMScorer.load(m.askllm, max_tokens=m.max_tokens, variant=variant, intra_op_threads=threads)
        self.embedder = SentenceEmbedder.load(m.embedder, dtype="float16", variant=variant, intra_op_threads=threads)
        if m.perplexity and self.perplexity is None:
            from streamfilter.models.perplexity import PerplexityScorer

            self.perplexity = PerplexityScorer.load(m.perplexity, max_tokens=m.max_tokens, variant=variant,
                                                    intra_op_threads=threads)
        log.info("score: Ask-LLM %s, embedder %s (dim %d)%s", self.scorer.model_id, self.embedder.model_id,
                 self.embedder.dim, f", perplexity {self.perplexity.model_id}" if self.perplexity else "")

    def __call__(self, records: list) -> Outputs:
        outputs = Outputs()
        good: list[tuple[object, Document]] = []
        max_bytes = self.config.records.max_doc_bytes
        for record in records:
            try:
                good.append((record, decode_raw(record.value, max_bytes)))
            except InvalidDocument as exc:
                add_dlq_output(outputs, self.config, self.stage, exc, record)
        if good:
            good, scores, embeddings = self._infer(good, outputs)
            nlls = self._perplexity([doc.text for _, doc in good])
            for (record, doc), score, embedding, nll in zip(good, scores.tolist(), embeddings, nlls):
                outputs.observe(metrics.ASKLLM_SCORE, score)
                scored = ScoredRecord(doc, score, embedding, self.scorer.model_id, self.embedder.model_id,
                                      (record.topic, record.partition, record.offset), perplexity=nll,
                                      perplexity_model=self.perplexity.model_id if self.perplexity else None)
                outputs.append(Output(self.config.topics.scored, encode_scored(scored), key=doc.id.encode()))
            outputs.count(metrics.DOCUMENTS, (self.stage, "scored"), len(good))
        return outputs

    def _perplexity(self, texts: list[str]) -> list[float | None]:
        """Mean NLL per document when a perplexity model is configured, else None per document."""
        if self.perplexity is None:
            return [None] * len(texts)
        t0 = time.perf_counter()
        nll = self.perplexity.score(texts, batch_size=self.config.models.inference_batch_docs)
        metrics.INFERENCE_SECONDS.labels("perplexity").observe(time.perf_counter() - t0)
        return nll.tolist()

    def _infer(self, good, outputs: Outputs):
        """Score a batch; a document the models refuse goes to the DLQ (in `outputs`) alone, the rest are kept."""
        texts = [doc.text for _, doc in good]
        batch = self.config.models.inference_batch_docs
        try:
            t0 = time.perf_counter()
            scores = self.scorer.score(texts, batch_size=batch)
            metrics.INFERENCE_SECONDS.labels("askllm").observe(time.perf_counter() - t0)
            t0 = time.perf_counter()
            embeddings = self.embedder.embed(texts, batch_size=batch)
            metrics.INFERENCE_SECONDS.labels("embedder").observe(time.perf_counter() - t0)
            return good, scores, embeddings
        except InvalidDocument:
            pass
        kept, scores, embeddings = [], [], []
        for record, doc in good:  # isolate the culprit(s)
            try:
                score = self.scorer.score([doc.text])
                embedding = self.embedder.embed([doc.text])
            except InvalidDocument as exc:
                add_dlq_output(outputs, self.config, self.stage, exc, record)
                continue
            kept.append((record, doc))
            scores.append(score[0])
            embeddings.append(embedding[0])
        dim = self.embedder.dim
        return (kept, np.asarray(scores, dtype=np.float32),
                np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float16))


class RouteTransform:
    """Pass 2: scored records → accepted / rejected, deciding with the newest snapshot.

    With `fixed=True` (replay), every decision uses `snapshot` (None only for `random`) and
    the store is never consulted; `stage` names the metrics' and DLQ headers' stage.
    """

    stage = "route"

    def __init__(self, config: Config, stopping: threading.Event | None = None, *, fixed: bool = False,
                 snapshot=None, stage: str | None = None):
        from streamfilter.density.snapshot import SnapshotStore

        self.config = config
        self.policy = build_policy(config)
        self.store = SnapshotStore(config.sketch.snapshot_dir, keep=config.sketch.keep_snapshots)
        self.prepared = None
        self.fixed_snapshot = fixed
        if fixed:
            self.prepared = self.policy.prepare(snapshot)  # PolicyNotReady propagates: the caller checks first
        if stage is not None:
            self.stage = stage
        self.stopping = stopping or threading.Event()
        self._checked_at = 0.0
        metrics.ACCEPT_RATE_TARGET.labels(self.policy.name).set(self.policy.keep_rate)

    @property
    def needs_snapshot(self) -> bool:
        return self.policy.name != "random"

    def wait_for_snapshot(self) -> None:
        """Block until a snapshot covering at least `route.min_snapshot_docs` documents exists."""
        if self.fixed_snapshot:
            return
        if not self.needs_snapshot:
            self.prepared = self.policy.prepare(self._latest())
            return
        waited_since = time.monotonic()
        while not self.stopping.is_set():
            if self._refresh():
                return
            if time.monotonic() - waited_since > 30:
                log.info("route: waiting for a snapshot with >= %d documents in %s",
                         self.config.route.min_snapshot_docs, self.config.sketch.snapshot_dir)
                waited_since = time.monotonic()
            self.stopping.wait(min(1.0, self.config.route.snapshot_poll_s))

    def _latest(self):
        before = self.store.corrupt_skipped
        snapshot = self.store.latest()
        if self.store.corrupt_skipped > before:
            metrics.SNAPSHOTS_CORRUPT.inc(self.store.corrupt_skipped - before)
        return snapshot

    def _refresh(self) -> bool:
        """Adopt a newer snapshot if there is one; True when a prepared policy is in place."""
        from streamfilter.density.policy import PolicyNotReady

        self._checked_at = time.monotonic()
        snapshot = self._latest()
        if snapshot is None or snapshot.doc_count < self.config.route.min_snapshot_docs:
            return self.prepared is not None
        if self.prepared is not None and self.prepared.snapshot_id == snapshot.snapshot_id:
            return True
        try:
            self.prepared = self.policy.prepare(snapshot)
        except PolicyNotReady as exc:
            log.info("route: snapshot %s not usable yet: %s", snapshot.snapshot_id, exc)
            return self.prepared is not None
        metrics.SNAPSHOT_TIMESTAMP.labels(self.stage).set(snapshot.created_at)
        log.info("route: deciding with snapshot %s (%d documents)", snapshot.snapshot_id, snapshot.doc_count)
        return True

    def __call__(self, records: list) -> list[Output]:
        if (self.needs_snapshot and not self.fixed_snapshot
                and time.monotonic() - self._checked_at >= self.config.route.snapshot_poll_s):
            self._refresh()
        outputs = Outputs()
        scored: list[tuple[object, ScoredRecord]] = []
        for record in records:
            try:
                scored.append((record, decode_scored(record.value)))
            except InvalidDocument as exc:
                add_dlq_output(outputs, self.config, self.stage, exc, record)
        if scored:
            self.decide(scored, outputs)
        return outputs

    def decisions(self, scored: list[ScoredRecord]) -> list:
        """The policy's `Decision` for each scored record (pure: no outputs, no metrics)."""
        return decide_scored(self.prepared, scored)

    def decide(self, scored: list[tuple[object, ScoredRecord]], outputs: Outputs) -> None:
        """Append the accepted (and rejected) records to `outputs`; decisions are counted on commit."""
        decisions = self.decisions([s for _, s in scored])
        topics = self.config.topics
        kept = 0
        for (_, s), decision in zip(scored, decisions):
            kept += decision.keep
            outputs.observe(metrics.KEEP_PROBABILITY.labels(decision.policy), decision.probability)
            if not math.isnan(decision.density):
                outputs.observe(metrics.DENSITY_SCORE, decision.density)
            topic = topics.accepted if decision.keep else topics.rejected
            if topic:
                outputs.append(Output(topic, encode_document(s.document), key=s.document.id.encode(),
                                      headers=decision_headers(decision, s)))
        name = self.policy.name
        outputs.count(metrics.DECISIONS, (name, "accepted"), kept)
        outputs.count(metrics.DECISIONS, (name, "rejected"), len(scored) - kept)
        outputs.count(metrics.DOCUMENTS, (self.stage, "accepted"), kept)
        outputs.count(metrics.DOCUMENTS, (self.stage, "rejected"), len(scored) - kept)


def decide_scored(prepared, scored: list[ScoredRecord]) -> list:
    """Decide a batch of scored records with a `PreparedPolicy` (the live route and replay share this)."""
    if not scored:
        return []
    ids = [s.document.id for s in scored]
    askllm = np.fromiter((s.askllm for s in scored), dtype=np.float64, count=len(scored))
    embeddings = np.stack([s.embedding for s in scored]).astype(np.float32) if prepared.sketch is not None else None
    perplexity = None
    if getattr(prepared, "perplexity_threshold", None) is not None:
        perplexity = np.array([np.nan if s.perplexity is None else s.perplexity for s in scored], dtype=np.float64)
    return prepared.decide(ids, askllm, embeddings, perplexity)


def decision_headers(decision, scored: ScoredRecord) -> list[tuple[str, bytes]]:
    topic, partition, offset = scored.source
    return [
        ("sf-decision", b"accept" if decision.keep else b"reject"),
        ("sf-policy", decision.policy.encode()),
        ("sf-snapshot", decision.snapshot_id.encode()),
        ("sf-askllm", repr(decision.askllm).encode()),
        ("sf-density", repr(decision.density).encode()),
        ("sf-probability", repr(decision.probability).encode()),
        ("sf-askllm-model", scored.askllm_model.encode()),
        ("sf-embedder-model", scored.embedder_model.encode()),
        ("sf-source", f"{topic}/{partition}/{offset}".encode()),
    ]


class SketchAggregator:
    """Consumes `crawl.scored` into a `SketchState`; snapshots carry the offsets they cover.

    Exactly-once counting does not need Kafka transactions here: the snapshot is the
    checkpoint. On start the newest valid snapshot is loaded and the consumer seeks to its
    offsets; documents counted after it are counted again from there after a crash, and
    never twice. Offsets are also committed to the group after each snapshot, for lag only.
    """

    stage = "sketch"

    def __init__(self, config: Config):
        from streamfilter.density.snapshot import SnapshotStore

        self.config = config
        self.store = SnapshotStore(config.sketch.snapshot_dir, keep=config.sketch.keep_snapshots)
        self.policy = build_policy(config)
        self.state = None
        self.consumer = None
        self._dirty = False
        self._records_at = time.monotonic()  # last poll that returned records (stall detection)
        self._stopping = threading.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sketch")
        metrics.READINESS.register(self.stage)

    def restore(self) -> None:
        from streamfilter.density.state import SketchState

        before = self.store.corrupt_skipped
        snapshot = self.store.latest()
        if self.store.corrupt_skipped > before:
            metrics.SNAPSHOTS_CORRUPT.inc(self.store.corrupt_skipped - before)
        if snapshot is not None:
            self.state = SketchState.restore(snapshot, policies=[self.policy])
            metrics.SNAPSHOT_TIMESTAMP.labels(self.stage).set(snapshot.created_at)
            metrics.SKETCH_DOCUMENTS.set(self.state.doc_count)
            log.info("sketch: restored snapshot %s (%d documents)", snapshot.snapshot_id, snapshot.doc_count)

    def _new_state(self, dim: int):
        from streamfilter.density import race, reservoir
        from streamfilter.density.state import SketchState

        s = self.config.sketch
        return SketchState.create(
            dim, rows=s.rows, buckets=s.buckets, k=s.k or race.DEFAULT_K, width=s.width or race.DEFAULT_WIDTH,
            seed=s.hash_seed, policy_seed=self.config.policy.seed,
            reservoir_size=s.reservoir_size or reservoir.DEFAULT_RESERVOIR_SIZE, policies=[self.policy])

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(self._watch(stop))
        try:
            await loop.run_in_executor(self._thread, self.restore)
            backoff = _Backoff(self.config.daemon.retry_backoff_max_s)
            while not stop.is_set():
                try:
                    await loop.run_in_executor(self._thread, self._connect)
                    break
                except Exception as exc:  # noqa: BLE001 - broker not reachable yet
                    metrics.BROKER_UP.labels(self.stage).set(0)
                    log.warning("sketch: cannot reach Kafka (%s); retrying", exc)
                    await _sleep_or_stop(backoff.next(), stop)
            metrics.READINESS.set(self.stage, True)
            last_snapshot = time.monotonic()
            while not stop.is_set():
                try:
                    await loop.run_in_executor(self._thread, self._poll_and_count)
                    if self._dirty and time.monotonic() - last_snapshot >= self.config.sketch.snapshot_interval_s:
                        await loop.run_in_executor(self._thread, self.write_snapshot)
                        last_snapshot = time.monotonic()
                    backoff.reset()
                except Exception:  # noqa: BLE001 - keep counting: reconnect and seek to the covered offsets
                    log.exception("sketch: consuming failed; reconnecting")
                    metrics.RETRIES.labels(self.stage).inc()
                    await _sleep_or_stop(backoff.next(), stop)
                    try:
                        await loop.run_in_executor(self._thread, self._reconnect)
                    except Exception as exc:  # noqa: BLE001
                        log.warning("sketch: reconnecting failed (%s); will retry", exc)
            if self._dirty:
                await loop.run_in_executor(self._thread, self.write_snapshot)
        finally:
            watcher.cancel()
            metrics.READINESS.set(self.stage, False)
            if self.consumer is not None:
                await loop.run_in_executor(self._thread, self.consumer.close)
            self._thread.shutdown(wait=False)

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
        metrics.BROKER_UP.labels(self.stage).set(1)

    def _check_stalled(self) -> None:
        """As `TransactionalLoop._check_stalled`: readable records ahead but none returned for a
        while (a kafka-python consumer seen stuck under load) → reconnect at the covered offsets."""
        from streamfilter.kafka_loop import STALL_CHECK_S, stuck_partitions

        if time.monotonic() - self._records_at < STALL_CHECK_S:
            return
        self._records_at = time.monotonic()
        if stuck_partitions(self.consumer, self.stage):
            metrics.RETRIES.labels(self.stage).inc()
            self._reconnect()

    def _reconnect(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:  # noqa: BLE001 - the old consumer is discarded either way
                pass
            self.consumer = None
        self._connect()

    def _poll_and_count(self) -> None:
        polled = self.consumer.poll(timeout_ms=min(self.config.batch.max_wait_ms, 500) or 100,
                                    max_records=self.config.batch.max_batch_docs)
        metrics.BROKER_UP.labels(self.stage).set(1 if broker_connected(self.consumer) else 0)
        records = [r for part in polled.values() for r in part]
        if not records:
            self._observe_lag()  # so that lag falls to 0 once caught up
            self._check_stalled()
            return
        self._records_at = time.monotonic()
        metrics.INPUT_DOCUMENTS.labels(self.stage).inc(len(records))
        ids, embeddings, askllm, coords, nll = [], [], [], [], []
        for record in records:
            try:
                scored = decode_scored(record.value)
            except InvalidDocument as exc:
                # The route stage sends these to the DLQ; the sketch only moves past them.
                log.warning("sketch: skipping %s/%d/%d: %s", record.topic, record.partition, record.offset, exc)
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
        self._observe_lag()

    def _observe_lag(self) -> None:
        # The position, not the covered offsets: only the position moves past transaction markers,
        # so lag from covered offsets never fell below 1 on a transactional topic.
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                try:
                    position = self.consumer.position(tp, timeout_ms=100)
                except Exception:  # noqa: BLE001 - lag is best effort; a miss is not an error
                    continue
                if position is not None:
                    metrics.CONSUMER_LAG.labels(self.stage, tp.topic, str(tp.partition)).set(max(0, high - position))

    def write_snapshot(self) -> None:
        if self.state is None:
            return
        snapshot = self.state.snapshot()
        path = self.store.write(snapshot)
        self._dirty = False
        metrics.SNAPSHOTS_WRITTEN.inc()
        metrics.SNAPSHOT_TIMESTAMP.labels(self.stage).set(snapshot.created_at)
        log.info("sketch: wrote snapshot %s (%d documents) to %s", snapshot.snapshot_id, snapshot.doc_count, path)
        self._commit_for_lag(snapshot.offsets)

    def _commit_for_lag(self, offsets: dict) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        try:
            self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
        except Exception as exc:  # noqa: BLE001 - informational only: the snapshot is the checkpoint
            log.debug("sketch: committing offsets for lag monitoring failed: %s", exc)
