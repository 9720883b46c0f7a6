"""SketchState: offsets, exactly-once counting across restore, merge of aggregators."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamfilter.density.snapshot import Snapshot
from streamfilter.density.state import SketchState
from streamfilter.policies import build_policy

DIM = 8


def records(n: int, partitions: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float16)
    ids = [f"doc-{seed}-{i}" for i in range(n)]
    coords = [("crawl.scored", i % partitions, i // partitions) for i in range(n)]
    return ids, x, rng.random(n), coords


def new_state(**kw) -> SketchState:
    return SketchState.create(DIM, rows=8, buckets=64, k=2, seed=1, policy_seed=2, reservoir_size=32, **kw)


def feed(state: SketchState, ids, x, askllm, coords, lo: int, hi: int) -> int:
    return state.on_batch(ids[lo:hi], x[lo:hi], askllm[lo:hi], coords[lo:hi])


def same_state(a: SketchState, b: SketchState) -> bool:
    return (a.offsets == b.offsets and a.doc_count == b.doc_count
            and np.array_equal(a.sketch.counters, b.sketch.counters)
            and a.quantiles.count == b.quantiles.count
            and np.array_equal(a.reservoir.priorities, b.reservoir.priorities)
            and np.array_equal(a.reservoir.embeddings, b.reservoir.embeddings))


def test_offsets_advance_to_next_offset():
    state = new_state()
    ids, x, a, coords = records(10, partitions=3)
    assert feed(state, ids, x, a, coords, 0, 10) == 10
    assert state.offsets == {("crawl.scored", 0): 4, ("crawl.scored", 1): 3, ("crawl.scored", 2): 3}
    assert state.doc_count == 10 and state.sketch.count == 10


def test_redelivered_records_are_not_counted_twice():
    state = new_state()
    ids, x, a, coords = records(20)
    feed(state, ids, x, a, coords, 0, 12)
    assert feed(state, ids, x, a, coords, 8, 20) == 8  # 8..11 were already counted
    assert state.duplicates_skipped == 4 and state.doc_count == 20
    once = new_state()
    feed(once, ids, x, a, coords, 0, 20)
    assert same_state(state, once)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 120), crash_at=st.integers(0, 120), batch=st.integers(1, 50))
def test_restore_from_snapshot_then_resume_equals_uninterrupted(n, crash_at, batch):
    ids, x, a, coords = records(n, partitions=3)
    crash_at = min(crash_at, n)
    uninterrupted = new_state()
    for lo in range(0, n, batch):
        feed(uninterrupted, ids, x, a, coords, lo, lo + batch)
    first = new_state()
    for lo in range(0, crash_at, batch):
        feed(first, ids, x, a, coords, lo, min(lo + batch, crash_at))
    snap = Snapshot.from_bytes(first.snapshot().to_bytes())  # through the file format
    resumed = SketchState.restore(snap)
    # the consumer seeks to the snapshot's offsets; replaying from 0 must not double count either
    for lo in range(0, n, batch):
        feed(resumed, ids, x, a, coords, lo, lo + batch)
    assert same_state(resumed, uninterrupted)


def test_merging_aggregators_of_disjoint_partitions():
    ids, x, a, coords = records(90, partitions=3)
    whole = new_state()
    feed(whole, ids, x, a, coords, 0, 90)
    parts = [new_state() for _ in range(3)]
    for i in range(90):
        parts[coords[i][1]].on_batch(ids[i:i + 1], x[i:i + 1], a[i:i + 1], coords[i:i + 1])
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    assert same_state(parts[0], whole)


def test_snapshot_precomputes_ips_constants():
    policies = [build_policy("density", 0.2), build_policy("askllm", 0.2), build_policy("askllm+density", 0.2)]
    state = SketchState.create(DIM, rows=50, buckets=200, k=2, reservoir_size=64, policies=policies)
    ids, x, a, coords = records(300)
    feed(state, ids, x, a, coords, 0, 300)
    snap = state.snapshot()
    assert set(snap.ips_constants) == {policies[0].key, policies[2].key}
    for policy in (policies[0], policies[2]):
        snap_without = Snapshot.from_bytes(snap.to_bytes())
        snap_without.ips_constants.clear()
        assert policy.prepare(snap_without).ips_constant == snap.ips_constants[policy.key]


def test_snapshot_is_a_copy():
    state = new_state()
    ids, x, a, coords = records(20)
    feed(state, ids, x, a, coords, 0, 10)
    snap = state.snapshot()
    before = snap.sketch.counters.copy()
    feed(state, ids, x, a, coords, 10, 20)
    assert np.array_equal(snap.sketch.counters, before) and snap.doc_count == 10
