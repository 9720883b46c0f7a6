"""The sketch aggregator's state: a plain object fed batches, snapshotted and restored exactly.

Bytewax-style (STYLE.md): no Kafka here. The daemon's `sketch` process consumes
`crawl.scored`, calls `on_batch` with each batch and its (topic, partition, offset)
coordinates, periodically writes `snapshot()` with a `SnapshotStore`, and on restart
builds the state with `restore(store.latest())` and seeks to `offsets`.

`on_batch` skips records at offsets the state already covers, so a batch replayed after a
restart is not counted twice even if the consumer re-delivers it.

Calibration (`create(width=None)`, what the daemon does by default): the sketch's width is
derived from the first `calibration_docs` embeddings of the stream (calibrate.stream_width).
Until then the embeddings wait in a bounded buffer (quantiles, reservoir, offsets and
counts are updated as usual); the sketch is built and the buffer added to it, once, when
the buffer is full or when anything needs the sketch first (`snapshot`, `merge`, reading
`sketch`), whichever comes first. Snapshots therefore always hold a built sketch, and the
calibrated width travels in it: a restart or replay uses the stored width, never a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from streamfilter.density.quantiles import DEFAULT_KLL_K, ScoreQuantiles
from streamfilter.density.calibrate import (DEFAULT_CALIBRATION_DOCS, DEFAULT_TARGET_RANDOM_COLLISION,
                                            STREAM_TARGET_RANDOM_COLLISION, stream_width)
from streamfilter.density.race import DEFAULT_BUCKETS, DEFAULT_K, DEFAULT_ROWS, DEFAULT_WIDTH, RaceSketch
from streamfilter.density.reservoir import DEFAULT_RESERVOIR_SIZE, Reservoir
from streamfilter.density.snapshot import Snapshot, new_snapshot_id
from streamfilter.policies import Policy, PolicyNotReady

log = logging.getLogger(__name__)
WIDTH_WARN_RATIO = 1.25  # a configured width this far (either way) from the stream's calibrated one is logged


class SketchState:
    """RACE sketch + Ask-LLM quantiles + reservoir + consumed offsets."""

    def __init__(self, sketch: RaceSketch | None, quantiles: ScoreQuantiles, reservoir: Reservoir,
                 offsets: dict[tuple[str, int], int], doc_count: int, policy_seed: int,
                 policies: Sequence[Policy] = (), plan: dict | None = None):
        self._sketch = sketch
        # sketch None: RaceSketch.create(**plan) once the width is calibrated from `_pending`
        self._plan = plan
        self._calibration_docs = int(plan.pop("calibration_docs")) if plan else 0
        self._target = float(plan.pop("target")) if plan else STREAM_TARGET_RANDOM_COLLISION
        self._pending: list[np.ndarray] = []  # embeddings waiting for the calibrated sketch (bounded)
        self._pending_docs = 0
        self._width_check: list[np.ndarray] | None = None  # sample for `_check_width`, see create
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
               width: float | None = DEFAULT_WIDTH, seed: int = 0, policy_seed: int = 0,
               reservoir_size: int = DEFAULT_RESERVOIR_SIZE, quantile_k: int = DEFAULT_KLL_K,
               policies: Sequence[Policy] = (), leave_one_out: bool = False,
               calibration_docs: int = DEFAULT_CALIBRATION_DOCS,
               target_random_collision: float | None = None) -> "SketchState":
        """width None: calibrate it from the first `calibration_docs` documents (module docstring).

        With a width given, the first `calibration_docs` documents are still sampled once, to log
        a warning when the width is far from the calibrated one (`WIDTH_WARN_RATIO`).
        target_random_collision: default 1e-4 for a leave-one-out sketch, 5e-4 (w = 1.5 on MiniLM) for a plain one.
        """
        if calibration_docs < 2:
            raise ValueError(f"calibration_docs must be at least 2, got {calibration_docs}")
        if target_random_collision is None:
            target_random_collision = (STREAM_TARGET_RANDOM_COLLISION if leave_one_out
                                       else DEFAULT_TARGET_RANDOM_COLLISION)
        plan = {"dim": dim, "rows": rows, "buckets": buckets, "k": k, "seed": seed, "leave_one_out": leave_one_out,
                "calibration_docs": calibration_docs, "target": target_random_collision}
        sketch = None
        if width is not None:
            sketch = RaceSketch.create(dim, rows=rows, buckets=buckets, k=k, width=width, seed=seed,
                                       leave_one_out=leave_one_out)
        state = cls(
            sketch=sketch,
            quantiles=ScoreQuantiles(quantile_k),
            reservoir=Reservoir.empty(dim, reservoir_size, seed=policy_seed),
            offsets={}, doc_count=0, policy_seed=policy_seed, policies=policies, plan=plan,
        )
        if sketch is not None:
            state._width_check = []
        return state

    @property
    def sketch(self) -> RaceSketch:
        """The RACE sketch; reading it before calibration has finished calibrates on what is buffered."""
        if self._sketch is None:
            self.calibrate()
        return self._sketch

    @sketch.setter
    def sketch(self, sketch: RaceSketch) -> None:
        self._sketch = sketch

    @property
    def calibrating(self) -> bool:
        """True while the width waits for the first `calibration_docs` documents."""
        return self._sketch is None

    @property
    def dim(self) -> int:
        return self._sketch.dim if self._sketch is not None else int(self._plan["dim"])

    def calibrate(self) -> float:
        """Build the sketch now, with the width calibrated on the buffered documents; returns the width.

        The width comes from the first `calibration_docs` buffered embeddings (fewer if fewer were
        seen); with fewer than 2, the package default is used. Every buffered embedding is then
        added, once. A no-op returning the width when the sketch exists.
        """
        if self._sketch is not None:
            return self._sketch.width
        buffered = np.concatenate(self._pending) if self._pending else np.empty((0, self.dim), np.float32)
        sample = buffered[:self._calibration_docs]
        try:
            width = stream_width(sample, self._plan["k"], self._target)
            log.info("sketch: calibrated width w = %g for K = %d on the first %d documents (random-pair collision %g)",
                     width, self._plan["k"], sample.shape[0], self._target)
        except ValueError as exc:  # fewer than 2 documents, or all of them identical
            width = DEFAULT_WIDTH
            log.warning("sketch: cannot calibrate on %d document(s) (%s); using the default width w = %g",
                        sample.shape[0], exc, width)
        self._sketch = RaceSketch.create(width=width, **self._plan)
        if buffered.shape[0]:
            self._sketch.add(buffered)
        self._pending, self._pending_docs = [], 0
        return width

    def _check_width(self, embeddings: np.ndarray) -> None:
        """Sample the first documents once; log when the configured width is far from the calibrated one."""
        self._width_check.append(np.array(embeddings, dtype=np.float32))
        have = sum(len(e) for e in self._width_check)
        if have < self._calibration_docs:
            return
        sample = np.concatenate(self._width_check)[:self._calibration_docs]
        self._width_check = None
        sketch = self._sketch
        try:
            suggested = stream_width(sample, sketch.k, self._target)
        except ValueError:  # all identical: nothing to compare with
            return
        if not 1 / WIDTH_WARN_RATIO <= sketch.width / suggested <= WIDTH_WARN_RATIO:
            log.warning("sketch: the configured width sketch.width = %g is far from the w = %g that the first %d "
                        "documents suggest for K = %d (random-pair collision %g); `streamfilter calibrate` on a "
                        "sample of embeddings prints the lines to paste, or set sketch.width = 0 to calibrate "
                        "on the stream", sketch.width, suggested, sample.shape[0], sketch.k, self._target)

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
            if self._sketch is None:
                self._pending.append(np.array(embeddings))  # a copy: the caller may reuse its buffer
                self._pending_docs += len(ids)
                if self._pending_docs >= self._calibration_docs:
                    self.calibrate()
            else:
                self._sketch.add(embeddings)
                if self._width_check is not None:
                    self._check_width(embeddings)
            self.quantiles.update(askllm)
            self.reservoir.offer(ids, embeddings, askllm)
            self.doc_count += len(ids)
        self.offsets = next_offsets
        return len(ids)

    def merge(self, other: "SketchState") -> None:
        """Fold in another aggregator's state (disjoint partitions, or the same partitions' later offsets).

        Both sketches must have the same parameters, width included: states that calibrate on their
        own streams get different widths (pin `sketch.width` where aggregators are merged)."""
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


def merge_snapshots(items: Sequence[tuple[object, Snapshot]], policies=(), allow_overlap: bool = False) -> Snapshot:
    """One snapshot of several aggregators' streams (`items`: (path, snapshot) pairs, the path only names
    them in errors); UserError naming the file that cannot be added."""
    from streamfilter.errors import UserError

    if len(items) < 2:
        raise UserError("merge needs at least two snapshots")
    (first_path, first), rest = items[0], items[1:]
    state = SketchState.restore(first, policies=policies)
    seen = {first.snapshot_id: first_path}
    for path, snapshot in rest:
        if snapshot.snapshot_id in seen:
            raise UserError(f"cannot merge {path}: it is snapshot {snapshot.snapshot_id} again ({seen[snapshot.snapshot_id]})")
        mismatch = first.sketch.parameter_mismatch(snapshot.sketch)
        if mismatch is not None:
            raise UserError(f"cannot merge {path}: other sketch parameters than {first_path}: {mismatch}")
        if snapshot.policy_seed != first.policy_seed:
            raise UserError(f"cannot merge {path}: policy seed {snapshot.policy_seed} != {first.policy_seed} "
                            f"of {first_path} (their reservoirs sample differently)")
        overlap = sorted(set(state.offsets) & set(snapshot.offsets))
        if overlap and not allow_overlap:
            topic, partition = overlap[0]
            raise UserError(f"cannot merge {path}: it also covers {topic}[{partition}], so those documents would "
                            "count twice (merge aggregators of disjoint partitions, or pass --allow-overlap)")
        state.merge(SketchState.restore(snapshot))
        seen[snapshot.snapshot_id] = path
    return state.snapshot()
