"""The perplexity baseline in the aggregator and the route: a second quantile sketch, the `perplexity` policy."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from streamfilter.density.snapshot import Snapshot
from streamfilter.density.state import SketchState
from streamfilter.policies import PolicyNotReady, build_policy
from streamfilter.records import Document, ScoredRecord
from streamfilter.stages import decide_scored

DIM = 8


def _feed(n=400, seed=0, with_nll=True, state=None, partition=0):
    rng = np.random.default_rng(seed)
    state = state or SketchState.create(DIM, rows=8, buckets=64, k=2, seed=1, policy_seed=2, reservoir_size=32)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    nll = rng.uniform(1.0, 6.0, n)
    nll[::50] = np.nan  # records scored without a perplexity model
    ids = [f"d{seed}-{i}" for i in range(n)]
    coords = [("crawl.scored", partition, i) for i in range(n)]
    state.on_batch(ids, x, rng.random(n), coords, perplexity=nll if with_nll else None)
    return state, nll


def test_state_counts_finite_perplexities_and_snapshots_round_trip_them():
    state, nll = _feed()
    assert state.perplexity_quantiles.count == int(np.isfinite(nll).sum())
    snap = Snapshot.from_bytes(state.snapshot().to_bytes())
    assert snap.perplexity_quantiles.count == state.perplexity_quantiles.count
    assert abs(snap.perplexity_quantiles.quantile(0.3) - np.nanquantile(nll, 0.3)) < 0.1
    restored = SketchState.restore(snap)
    assert restored.perplexity_quantiles.count == state.perplexity_quantiles.count


def test_merge_adds_the_perplexity_sketches():
    a, _ = _feed(seed=0, partition=0)
    b, _ = _feed(seed=1, partition=1)
    total = a.perplexity_quantiles.count + b.perplexity_quantiles.count
    a.merge(b)
    assert a.perplexity_quantiles.count == total


def test_snapshots_without_perplexity_are_unchanged_and_older_payloads_load():
    state, _ = _feed(with_nll=False)
    data = state.snapshot().to_bytes()
    from streamfilter.density.snapshot import _HEADER

    payload = msgpack.unpackb(data[_HEADER.size:], raw=False)
    assert "perplexity_quantiles" not in payload  # the same payload keys as before the field existed
    snap = Snapshot.from_bytes(data)
    assert snap.perplexity_quantiles.count == 0
    with pytest.raises(PolicyNotReady, match="no perplexity"):
        build_policy("perplexity", 0.3).prepare(snap)


def test_perplexity_policy_keeps_the_lowest_fraction_and_drops_missing_scores():
    state, nll = _feed(n=2000)
    snap = state.snapshot()
    prepared = build_policy("perplexity", 0.3).prepare(snap)
    ids = [f"q{i}" for i in range(len(nll))]
    decisions = prepared.decide(ids, np.full(len(nll), 0.5), None, nll)
    keep = np.array([d.keep for d in decisions])
    finite = np.isfinite(nll)
    assert not keep[~finite].any()
    assert abs(keep[finite].mean() - 0.3) < 0.03
    assert nll[keep].max() <= np.nanquantile(nll, 0.33) and nll[finite & ~keep].min() >= np.nanquantile(nll, 0.27)
    # the route's decide_scored reads the perplexity from scored records
    docs = [ScoredRecord(Document(id=i, text="t"), 0.5, np.zeros(DIM, np.float16), "a", "e", ("t", 0, k),
                         perplexity=None if np.isnan(v) else float(v)) for k, (i, v) in enumerate(zip(ids, nll))]
    assert [d.keep for d in decide_scored(prepared, docs)] == keep.tolist()
