"""The sketch aggregator's state: a plain object fed batches, snapshotted and restored exactly.

Bytewax-style (STYLE.md): no Kafka here. The daemon's `sketch` process consumes
`crawl.scored`, calls `on_batch` with each batch and its (topic, partition, offset)
coordinates, periodically writes `snapshot()` with a `SnapshotStore`, and on restart
builds the state with `restore(store.latest())` and seeks to `offsets`.

`on_batch` skips records at offsets the state already covers, so a batch replayed after a
restart is not counted twice even if the consumer re-delivers it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from streamfilter.density.policy import Policy, PolicyNotReady
from streamfilter.density.quantiles import DEFAULT_KLL_K, ScoreQuantiles
from streamfilter.density.race import DEFAULT_BUCKETS, DEFAULT_K, DEFAULT_ROWS, DEFAULT_WIDTH, RaceSketch
from streamfilter.density.reservoir import DEFAULT_RESERVOIR_SIZE, Reservoir
from streamfilter.density.snapshot import Snapshot, new_snapshot_id

log = logging.getLogger(__name__)


class SketchState:
    """RACE sketch + Ask-LLM quantiles + reservoir + consumed offsets."""

    def __init__(self, sketch: RaceSketch, quantiles: ScoreQuantiles, reservoir: Reservoir,
                 offsets: dict[tuple[str, int], int], doc_count: int, policy_seed: int,
                 policies: Sequence[Policy] = ()):
        self.sketch = sketch
        self.quantiles = quantiles
        self.reservoir = reservoir
        self.offsets = dict(offsets)
        self.doc_count = int(doc_count)
        self.policy_seed = int(policy_seed)
        self.policies = tuple(policies)  # their IPS constants are precomputed into each snapshot
        self.duplicates_skipped = 0  # records at already-covered offsets (re-deliveries)
        self.perplexity_quantiles = ScoreQuantiles(quantiles.k)  # mean NLL (perplexity policy); empty if unscored

    @classmethod
    def create(cls, dim: int, *, rows: int = DEFAULT_ROWS, buckets: int = DEFAULT_BUCKETS, k: int = DEFAULT_K,
               width: float = DEFAULT_WIDTH, seed: int = 0, policy_seed: int = 0,
               reservoir_size: int = DEFAULT_RESERVOIR_SIZE, quantile_k: int = DEFAULT_KLL_K,
               policies: Sequence[Policy] = ()) -> "SketchState":
        return cls(
            sketch=RaceSketch.create(dim, rows=rows, buckets=buckets, k=k, width=width, seed=seed),
            quantiles=ScoreQuantiles(quantile_k),
            reservoir=Reservoir.empty(dim, reservoir_size, seed=policy_seed),
            offsets={}, doc_count=0, policy_seed=policy_seed, policies=policies,
        )

    @classmethod
    def restore(cls, snapshot: Snapshot, policies: Sequence[Policy] = ()) -> "SketchState":
        """The state a snapshot was taken from (copies the arrays: the snapshot stays unchanged)."""
        state = cls(snapshot.sketch.copy(), snapshot.quantiles.copy(), snapshot.reservoir.copy(),
                    snapshot.offsets, snapshot.doc_count, snapshot.policy_seed, policies)
        state.perplexity_quantiles = snapshot.perplexity_quantiles.copy()
        return state

    def on_batch(self, ids: Sequence[str], embeddings: np.ndarray, askllm: np.ndarray,
                 coords: Sequence[tuple[str, int, int]], perplexity: np.ndarray | None = None) -> int:
        """Count a batch: ids [n], embeddings [n, dim], askllm [n], coords [(topic, partition, offset)] * n.

        `perplexity`: optional [n] mean NLL per document (NaN where a record has none); the
        finite ones go into `perplexity_quantiles` (the `perplexity` policy's threshold).

        Records whose offset is below the partition's next offset are skipped. Returns the
        number of documents added; `offsets[(topic, partition)]` becomes last offset + 1.
        """
        n = len(ids)
        embeddings = np.asarray(embeddings)
        askllm = np.asarray(askllm, dtype=np.float64).reshape(-1)
        if not (embeddings.shape[:1] == (n,) and askllm.shape == (n,) and len(coords) == n):
            raise ValueError(f"batch of {n} ids with embeddings {embeddings.shape}, "
                             f"{askllm.shape[0]} scores and {len(coords)} coordinates")
        fresh = np.ones(n, dtype=bool)
        next_offsets = dict(self.offsets)
        for i, (topic, partition, offset) in enumerate(coords):
            key = (topic, int(partition))
            if offset < next_offsets.get(key, 0):
                fresh[i] = False
            else:
                next_offsets[key] = int(offset) + 1
        if not fresh.all():
            self.duplicates_skipped += int(n - fresh.sum())
            ids = [doc_id for doc_id, f in zip(ids, fresh) if f]
            embeddings, askllm = embeddings[fresh], askllm[fresh]
            perplexity = None if perplexity is None else np.asarray(perplexity, dtype=np.float64).reshape(-1)[fresh]
        if len(ids):
            if perplexity is not None:
                nll = np.asarray(perplexity, dtype=np.float64).reshape(-1)
                self.perplexity_quantiles.update(nll[np.isfinite(nll)])
            self.sketch.add(embeddings)
            self.quantiles.update(askllm)
            self.reservoir.offer(ids, embeddings, askllm)
            self.doc_count += len(ids)
        self.offsets = next_offsets
        return len(ids)

    def merge(self, other: "SketchState") -> None:
        """Fold in another aggregator's state (disjoint partitions, or the same partitions' later offsets)."""
        self.sketch.merge(other.sketch)
        self.quantiles.merge(other.quantiles)
        self.perplexity_quantiles.merge(other.perplexity_quantiles)
        self.reservoir.merge(other.reservoir)
        for key, offset in other.offsets.items():
            self.offsets[key] = max(offset, self.offsets.get(key, 0))
        self.doc_count += other.doc_count

    def snapshot(self) -> Snapshot:
        """A consistent copy of the state, with the IPS constants of `policies` solved on it."""
        snap = Snapshot(
            snapshot_id=new_snapshot_id(self.doc_count),
            created_at=time.time(),
            sketch=self.sketch.copy(),
            quantiles=self.quantiles.copy(),
            offsets=dict(self.offsets),
            doc_count=self.doc_count,
            policy_seed=self.policy_seed,
            reservoir=self.reservoir.copy(),
            perplexity_quantiles=self.perplexity_quantiles.copy(),
        )
        for policy in self.policies:
            if policy.uses_density:
                try:
                    snap.ips_constants[policy.key] = policy.solve_constant(snap)
                except PolicyNotReady as exc:
                    log.debug("no IPS constant yet for %s: %s", policy.key, exc)
        return snap
