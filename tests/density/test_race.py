"""RaceSketch: shapes, debiasing, merge, serialisation, overflow; hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import kendalltau

from streamfilter.density.race import SCORE_FLOOR, RaceSketch, lsh_kernel, pstable_collision_probability


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_add_and_query_shapes_and_dtypes():
    sketch = RaceSketch.create(16, rows=20, buckets=100, k=3, width=1.0, seed=1)
    x = unit(50, 16)
    sketch.add(x.astype(np.float16))
    assert sketch.count == 50
    assert sketch.counters.dtype == np.int32 and sketch.counters.shape == (20, 100)
    assert (sketch.counters.sum(axis=1) == 50).all()  # one increment per row per document
    scores = sketch.query(x)
    assert scores.shape == (50,) and scores.dtype == np.float64
    assert (scores >= SCORE_FLOOR).all() and np.isfinite(1.0 / scores).all()
    assert sketch.query(np.empty((0, 16), np.float32)).shape == (0,)


def test_rejects_bad_input():
    sketch = RaceSketch.create(8, rows=4, buckets=16, k=2)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        sketch.add(np.zeros((3, 7), np.float32))
    bad = np.zeros((2, 8), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sketch.query(bad)
    with pytest.raises(ValueError):
        RaceSketch.create(8, k=0)
    with pytest.raises(ValueError):
        RaceSketch.create(8, width=0.0)


def test_self_density_and_duplicates():
    """A point added m times scores about m more than before (the kernel is 1 at distance 0)."""
    sketch = RaceSketch.create(32, rows=200, buckets=5000, k=8, width=1.0)
    background = unit(500, 32, seed=1)
    sketch.add(background)
    probe = unit(1, 32, seed=2)
    before = sketch.query(probe)[0]
    for _ in range(7):
        sketch.add(probe)
    after = sketch.query(probe)[0]
    assert after - before == pytest.approx(7.0, abs=0.05)


def test_debiasing_removes_spurious_bucket_mass():
    """With N >> B, raw counts carry N/B of spurious mass; the debiased score of a far point is ~0."""
    dim, n, buckets = 32, 20000, 200
    sketch = RaceSketch.create(dim, rows=100, buckets=buckets, k=8, width=0.5, seed=3)
    sketch.add(unit(n, dim, seed=4))
    far = unit(200, dim, seed=5)  # random directions: K-tuple collisions with the data are ~impossible
    raw = sketch.raw_counts(far)
    assert raw.mean() == pytest.approx(n / buckets, rel=0.05)  # the tuple hash spreads like a uniform hash
    debiased = (raw - n / buckets) / (1 - 1 / buckets)
    assert abs(debiased.mean()) < 0.05 * n / buckets
    assert np.allclose(sketch.query(far), np.maximum(debiased, SCORE_FLOOR))


def test_scores_track_exact_lsh_kernel_sum(make_clustered):
    x, _ = make_clustered(1500, dim=32, clusters=8, spread=0.6, weights=np.arange(1, 9))
    width, k = 1.0, 4
    sketch = RaceSketch.create(32, rows=400, buckets=20000, k=k, width=width, seed=7)
    sketch.add(x)
    d = np.sqrt(np.maximum(2 - 2 * (x @ x.T), 0))
    exact = lsh_kernel(d, width, k).sum(axis=1)
    est = sketch.query(x)
    assert kendalltau(est, exact).statistic > 0.8
    assert np.median(est / exact) == pytest.approx(1.0, abs=0.1)  # unbiased, not just rank-correlated


def reference_buckets(sketch: RaceSketch, x: np.ndarray) -> np.ndarray:
    """The documented hash, in float64 and Python-sized integers: [n, rows] bucket indices."""
    rows, k = sketch.rows, sketch.k
    z = (x.astype(np.float64) @ sketch.projections.astype(np.float64) + sketch.offsets) / sketch.width
    cells = np.floor(z).astype(np.int64).reshape(len(x), k, rows)  # hash j of row r is column j * rows + r
    code = (0x4B400000 + cells) % 2**32  # each cell enters the tuple hash as its float32 bit pattern
    mult = sketch.tuple_multipliers.astype(np.int64)[None]
    h = ((code * mult).sum(axis=1) + sketch.tuple_addend.astype(np.int64)) % 2**32
    return (h * sketch.buckets) >> 32


def test_hash_matches_its_definition():
    sketch = RaceSketch.create(24, rows=50, buckets=1000, k=4, width=0.8, seed=4)
    x = unit(300, 24, seed=6)
    agree = sketch.bucket_indices(x) == reference_buckets(sketch, x)
    assert agree.mean() > 0.999  # float32 vs float64 may differ for points within ~1e-6 of a cell edge


def test_collision_probability_formula_matches_simulation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200000)
    b = rng.random(200000)
    for dist in (0.3, 1.0, 2.5):
        empirical = (np.floor(b) == np.floor(a * dist + b)).mean()  # w = 1, x - y = dist along a
        assert pstable_collision_probability(dist, 1.0) == pytest.approx(empirical, abs=0.005)
    assert pstable_collision_probability(0.0, 1.0) == 1.0


def test_merge_refuses_different_parameters_by_name():
    a = RaceSketch.create(8, rows=4, buckets=16, k=2, seed=0)
    with pytest.raises(ValueError, match="buckets"):
        a.merge(RaceSketch.create(8, rows=4, buckets=17, k=2, seed=0))
    with pytest.raises(ValueError, match="width"):
        a.merge(RaceSketch.create(8, rows=4, buckets=16, k=2, width=2.0, seed=0))
    with pytest.raises(ValueError, match="projections"):
        a.merge(RaceSketch.create(8, rows=4, buckets=16, k=2, seed=1))
    assert a.params_equal(RaceSketch.create(8, rows=4, buckets=16, k=2, seed=0))


def test_counters_widen_before_overflow():
    sketch = RaceSketch.create(4, rows=3, buckets=8, k=1)
    sketch.count = np.iinfo(np.int32).max - 1  # pretend 2**31 - 2 documents were added
    sketch.add(unit(3, 4))
    assert sketch.counters.dtype == np.int64
    assert sketch.count == np.iinfo(np.int32).max + 2


def test_arrays_round_trip_exactly():
    sketch = RaceSketch.create(16, rows=10, buckets=50, k=3, width=0.7, seed=9)
    sketch.add(unit(30, 16))
    again = RaceSketch.from_arrays({k: v.copy() for k, v in sketch.to_arrays().items()})
    assert again.params_equal(sketch) and again.count == sketch.count
    assert np.array_equal(again.counters, sketch.counters)
    x = unit(5, 16, seed=3)
    assert np.array_equal(again.query(x), sketch.query(x))


def test_a_copy_counts_apart_and_hashes_the_same():
    sketch = RaceSketch.create(16, rows=10, buckets=50, k=3, width=0.7, seed=9, leave_one_out=True)
    sketch.add(unit(30, 16))
    copied = sketch.copy()
    assert copied.params_equal(sketch) and copied.count == sketch.count and copied.leave_one_out
    assert np.array_equal(copied.counters, sketch.counters) and copied.counters is not sketch.counters
    x = unit(5, 16, seed=3)
    assert np.array_equal(copied.query(x), sketch.query(x))
    before = sketch.counters.copy()
    copied.add(unit(7, 16, seed=4))  # the copy counts on its own; the original is unchanged
    assert np.array_equal(sketch.counters, before) and sketch.count == 30 and copied.count == 37
    other = RaceSketch.from_arrays({k: v.copy() for k, v in copied.to_arrays().items()})
    assert np.array_equal(copied.query(x), other.query(x))  # as if built from its arrays


# ------------------------------------------------------------------ hypothesis properties

batches = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(sizes=batches, split=st.integers(min_value=0, max_value=5), seed=st.integers(0, 2**16))
def test_merge_equals_one_sketch_of_the_concatenation(sizes, split, seed):
    dim = 12
    data = [unit(n, dim, seed + i) for i, n in enumerate(sizes)]
    whole = RaceSketch.create(dim, rows=16, buckets=64, k=3, seed=5)
    for x in data:
        whole.add(x)
    left, right = RaceSketch.create(dim, rows=16, buckets=64, k=3, seed=5), RaceSketch.create(dim, rows=16, buckets=64, k=3, seed=5)
    for x in data[:split]:
        left.add(x)
    for x in data[split:]:
        right.add(x)
    left.merge(right)
    assert left.count == whole.count
    assert np.array_equal(left.counters, whole.counters)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 120), cuts=st.lists(st.integers(0, 120), max_size=4), seed=st.integers(0, 2**16))
def test_batch_boundaries_do_not_matter(n, cuts, seed):
    x = unit(n, 10, seed)
    one = RaceSketch.create(10, rows=8, buckets=32, k=2, seed=1)
    one.add(x)
    many = RaceSketch.create(10, rows=8, buckets=32, k=2, seed=1)
    edges = sorted({0, n, *[c % (n + 1) for c in cuts]})
    for lo, hi in zip(edges[:-1], edges[1:]):
        many.add(x[lo:hi])
    assert np.array_equal(one.counters, many.counters)
    perm = np.random.default_rng(seed).permutation(n)
    assert np.array_equal(one.query(x)[perm], many.query(x[perm]))
