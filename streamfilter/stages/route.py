"""Pass 2 (route): scored records → accepted / rejected, deciding with the newest snapshot."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from streamfilter import metrics
from streamfilter.config import Config, OutputConfig, RouteConfig, build_policy
from streamfilter.errors import InvalidDocument
from streamfilter.kafka_loop import Output, Outputs
from streamfilter.records import (
    Provenance, ScoredRecord, carried_headers, decision_json, decode_scored, encode_document,
)
from streamfilter.stages.dlq import DlqTarget, add_dlq_output

if TYPE_CHECKING:  # the store's module loads the snapshot format: imported when a route is built
    from streamfilter.density.snapshot_store import SnapshotStore
    from streamfilter.policies import Policy

log = logging.getLogger("streamfilter.stages")


class RouteTransform:
    """Pass 2: scored records → accepted / rejected, deciding with the newest snapshot.

    With `fixed=True` (replay), every decision uses `snapshot` (None only for a policy that
    needs none: `random`) and the store is never consulted; `stage` names the metrics' and
    DLQ headers' stage.

    `handoff` (`run`: the aggregator in the same process) hands over each snapshot the
    aggregator has just written: the route wakes as soon as one is published and adopts it
    without reading the file back. Files it does not hold are loaded and verified as always.
    """

    stage = "route"

    def __init__(self, policy: Policy, store: SnapshotStore, accepted_topic: str, rejected_topic: str,
                 dlq: DlqTarget, settings: RouteConfig, output: OutputConfig, stopping: threading.Event | None = None,
                 *, fixed: bool = False, snapshot=None, stage: str = "route", handoff=None, job: str = "live"):
        self.policy = policy
        self.store = store
        self.accepted_topic = accepted_topic
        self.rejected_topic = rejected_topic  # "": rejected documents are counted, not written
        self.dlq = dlq
        self.settings = settings  # min_snapshot_docs, snapshot_poll_s
        self.output = output  # the value format and which input headers go on
        self.prepared = None
        self.fixed_snapshot = fixed
        if fixed:
            self.prepared = self.policy.prepare(snapshot)  # PolicyNotReady propagates: the caller checks first
        self.stage = stage
        self.stopping = stopping or threading.Event()
        self.handoff = handoff  # density.snapshot_store.SnapshotHandoff, or None
        p = self.policy
        self.provenance = Provenance(p.name, p.keep_rate, p.quality_keep, p.seed, job=job)
        self._provenance_headers = self.provenance.headers()  # the same on every record: built once
        self._checked_at = 0.0
        self._newest_seen: str | None = None  # name of the newest file when the store was last read
        self._handoff_seen = 0  # handoff.version when last looked at
        self._handed_over = False  # the last snapshot read came from the handoff, not its file
        metrics.ACCEPT_RATE_TARGET.labels(self.policy.name).set(self.policy.keep_rate)

    @classmethod
    def from_config(cls, config: Config, stopping: threading.Event | None = None, *, accepted_topic: str | None = None,
                    rejected_topic: str | None = None, dlq_topic: str | None = None, **options) -> "RouteTransform":
        """The route of `config` (a replay names its own output topics; `rejected_topic=""` writes none)."""
        from streamfilter.stages.store import open_store

        return cls(build_policy(config), open_store(config), accepted_topic or config.topics.accepted,
                   config.topics.rejected if rejected_topic is None else rejected_topic,
                   DlqTarget.of(config, dlq_topic), config.route, config.output, stopping, **options)

    @property
    def needs_snapshot(self) -> bool:
        return self.policy.needs_snapshot

    def wait_for_snapshot(self) -> None:
        """Block until a snapshot covering at least `route.min_snapshot_docs` documents exists."""
        if self.fixed_snapshot:
            return
        if not self.needs_snapshot:
            self.prepared = self.policy.prepare(self.store.latest())
            return
        waited_since = time.monotonic()
        while not self.stopping.is_set():
            if self._refresh():
                return
            if time.monotonic() - waited_since > 30:
                log.info("route: waiting for a snapshot with >= %d documents in %s",
                         self.settings.min_snapshot_docs, self.store.directory)
                waited_since = time.monotonic()
            wait_s = min(1.0, self.settings.snapshot_poll_s)
            if self.handoff is not None:
                self.handoff.wait(self._handoff_seen, wait_s)  # wakes as soon as the aggregator writes one
            else:
                self.stopping.wait(wait_s)


    def _newest(self):
        """The newest snapshot, read only when the store's newest file is one not seen before (None
        otherwise): a file never changes under its name, and loading one costs a read and a sha256
        of ~100 MB. The handoff's object is taken instead of the file when it is that file."""
        if self.handoff is not None:
            self._handoff_seen = self.handoff.version
        files = self.store.list()
        if not files or files[0].name == self._newest_seen:
            return None
        self._newest_seen = files[0].name
        snapshot = self.handoff.get(files[0]) if self.handoff is not None else None
        self._handed_over = snapshot is not None
        if snapshot is None:
            snapshot = self.store.latest()  # verified; a corrupt newest file falls back to an older one
        return snapshot

    def _refresh(self) -> bool:
        """Adopt a newer snapshot if there is one; True when a prepared policy is in place."""
        from streamfilter.policies import PolicyNotReady

        self._checked_at = time.monotonic()
        snapshot = self._newest()
        if snapshot is None or snapshot.doc_count < self.settings.min_snapshot_docs:
            return self.prepared is not None
        if self.prepared is not None and self.prepared.snapshot_id == snapshot.snapshot_id:
            return True
        try:
            self.prepared = self.policy.prepare(snapshot)
        except PolicyNotReady as exc:
            log.info("route: snapshot %s not usable yet: %s", snapshot.snapshot_id, exc)
            return self.prepared is not None
        metrics.SNAPSHOT_TIMESTAMP.labels(self.stage).set(snapshot.created_at)
        log.info("route: deciding with snapshot %s (%d documents%s)", snapshot.snapshot_id, snapshot.doc_count,
                 ", handed over in-process" if self._handed_over else "")
        return True

    def __call__(self, records: list) -> list[Output]:
        if self.needs_snapshot and not self.fixed_snapshot and (
                time.monotonic() - self._checked_at >= self.settings.snapshot_poll_s
                or (self.handoff is not None and self.handoff.version != self._handoff_seen)):
            self._refresh()
        outputs = Outputs()
        scored: list[tuple[object, ScoredRecord]] = []
        for record in records:
            try:
                scored.append((record, decode_scored(record.value)))
            except InvalidDocument as exc:
                add_dlq_output(outputs, self.dlq, self.stage, exc, record)
        if scored:
            self.decide(scored, outputs)
        return outputs

    def decisions(self, scored: list[ScoredRecord]) -> list:
        """The policy's `Decision` for each scored record (pure: no outputs, no metrics)."""
        return decide_scored(self.prepared, scored)

    def decide(self, scored: list[tuple[object, ScoredRecord]], outputs: Outputs) -> None:
        """Append the accepted (and rejected) records to `outputs`; decisions are counted on commit."""
        decisions = self.decisions([s for _, s in scored])
        kept = 0
        rejected = 0
        for (record, s), decision in zip(scored, decisions):
            topic = self.accepted_topic if decision.keep else self.rejected_topic
            if topic:
                try:
                    value = (decision_json(s, decision, self.provenance) if self.output.format == "json"
                             else encode_document(s.document))
                except Exception as exc:  # noqa: BLE001 - one document's fields, not the batch
                    add_dlq_output(outputs, self.dlq, self.stage,
                                   InvalidDocument("unencodable", f"{type(exc).__name__}: {exc}"), record)
                    continue
                input_headers = getattr(record, "headers", None) or ()
                headers = [*decision_headers(decision, s), *self._provenance_headers,
                           *carried_headers(input_headers, self.output.input_headers)]
                outputs.append(Output(topic, value, key=s.document.id.encode(), headers=headers))
                produced_ms = dict(input_headers).get("sf-produced-ms")
                if produced_ms is not None:  # stamped by the score stage: the raw record's produce time
                    try:
                        outputs.observe_since(metrics.DECISION_LATENCY.labels(self.stage), int(produced_ms) / 1000)
                    except ValueError:
                        pass
            kept += decision.keep
            rejected += not decision.keep
            outputs.observe(metrics.KEEP_PROBABILITY.labels(decision.policy), decision.probability)
            if not math.isnan(decision.density):
                outputs.observe(metrics.DENSITY_SCORE, decision.density)
        name = self.policy.name
        outputs.count(metrics.DECISIONS, (name, "accepted"), kept)
        outputs.count(metrics.DECISIONS, (name, "rejected"), rejected)
        outputs.count(metrics.DOCUMENTS, (self.stage, "accepted"), kept)
        outputs.count(metrics.DOCUMENTS, (self.stage, "rejected"), rejected)


def decide_scored(prepared, scored: list[ScoredRecord]) -> list:
    """Decide a batch of scored records with a `PreparedPolicy` (the live route and replay share this)."""
    if not scored:
        return []
    ids = [s.document.id for s in scored]
    askllm = np.fromiter((s.askllm for s in scored), dtype=np.float64, count=len(scored))
    embeddings = np.stack([s.embedding for s in scored]).astype(np.float32) if prepared.sketch is not None else None
    perplexity = None
    if prepared.policy.uses_perplexity:
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
