"""Choosing the bandwidth w of the p-stable LSH from a sample of embeddings.

The kernel the sketch estimates is p(d / w)^K, p the p-stable collision probability at
distance d. The bandwidth decides what "dense" means: too wide and every pair collides (the
score is nearly constant: sampling degenerates to random), too narrow and only duplicates
collide (the score is mostly the point itself). We fix the collision probability of a
*typical random pair* of the sample (at the median pairwise distance) to a small target,
which makes w scale with the embedding model's geometry (Sentence-T5's embeddings are
far more concentrated than MiniLM's) and grow with K as it should.

The default target, 5e-4, is what K=8, w=1.5 gives on all-MiniLM-L6-v2 embeddings of the
Wikipedia summaries, the setting the benchmarks chose (bench/RESULTS.md, "Density sketch").
On that data the best coverage of each K sat at random-pair collision ~5e-4 (near-duplicate
over-representation) to ~5e-3 (over-representation by distinct documents).

The daemon's sketch is leave-one-out (race.py), which lets it use a narrower kernel: it
calibrates its own width from the first `DEFAULT_CALIBRATION_DOCS` documents of the stream
(`stream_width`, random-pair collision `STREAM_TARGET_RANDOM_COLLISION` = 1e-4, w = 1.16 at
K = 8 on MiniLM) and stores it in the sketch, so a restart or a replay never re-derives it.
The median random-pair distance is used because it is stable in the sample size (a
nearest-neighbour distance shrinks as the sample grows). bench/RESULTS.md, "Density
fidelity (issue 13)", has the measurements behind the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamfilter.density.race import RaceSketch, lsh_kernel

DEFAULT_TARGET_RANDOM_COLLISION = 5e-4  # the plain (not leave-one-out) sketch's, w = 1.5 at K = 8 on MiniLM
STREAM_TARGET_RANDOM_COLLISION = 1e-4  # the leave-one-out sketch the daemon builds
DEFAULT_CALIBRATION_DOCS = 1000  # the daemon calibrates on this many first documents
CALIBRATION_PAIRS = 20000  # random pairs whose median distance sets the width
WIDTH_DIGITS = 4  # calibrated widths are rounded to this many significant digits (what the config line shows)
DEFAULT_NEIGHBOURS = 10
_PAIR_BLOCK = 2048  # random pairs whose distances are computed at once (12 MB of float64 at 768 dimensions)
DEFAULT_SAMPLE = 2000


@dataclass(frozen=True)
class Calibration:
    k: int
    width: float
    sample_size: int
    near_distance: float  # median distance to the m-th nearest neighbour within the sample
    random_distance: float  # median distance of random pairs
    predicted_near: float  # p(near_distance / w)^K
    predicted_random: float  # p(random_distance / w)^K (= the target)
    measured_near: float  # row-collision rate in a real sketch of pairs within 5% of near_distance
    measured_random: float  # same for pairs within 5% of random_distance (includes ~1/B of bucket collisions)
    buckets: int


def distance_profile(sample: np.ndarray, neighbours: int = DEFAULT_NEIGHBOURS, seed: int = 0
                     ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(median m-th-NN distance, median random-pair distance, near pairs [n, 2], random pairs [n, 2])."""
    x = np.asarray(sample, dtype=np.float32)
    n = x.shape[0]
    if n < neighbours + 2:
        raise ValueError(f"need at least {neighbours + 2} embeddings to calibrate, got {n}")
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(d2, np.inf)
    nn = np.argpartition(d2, neighbours - 1, axis=1)[:, neighbours - 1]
    near = np.sqrt(d2[np.arange(n), nn])
    rng = np.random.default_rng(seed)
    pairs = 20 * n
    a = rng.integers(0, n, size=pairs)
    b = (a + rng.integers(1, n, size=pairs)) % n  # never a point with itself
    rand = np.sqrt(d2[a, b])
    return (float(np.median(near)), float(np.median(rand)),
            np.stack([np.arange(n), nn], axis=1), np.stack([a, b], axis=1))


def width_for_collision(distance: float, k: int, target: float) -> float:
    """The w with p(distance / w)^K == target (p increases with w, so bisection in log w)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target collision probability {target} outside (0, 1)")
    if distance <= 0:
        raise ValueError("distance must be positive")
    lo, hi = distance * 1e-4, distance * 1e4
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        if lsh_kernel(distance, mid, k) < target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def random_pair_distance(sample: np.ndarray, pairs: int = CALIBRATION_PAIRS, seed: int = 0) -> float:
    """Median distance of `pairs` random pairs of distinct rows of sample [n >= 2, dim] (float64 arithmetic).

    Deterministic for a given sample and seed: the pairs come from numpy's PCG64 stream of `seed`.
    """
    x = np.asarray(sample, dtype=np.float64)
    n = x.shape[0]
    if x.ndim != 2 or n < 2:
        raise ValueError(f"need at least 2 embeddings [n, dim] to calibrate, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=pairs)
    b = (a + rng.integers(1, n, size=pairs)) % n  # never a point with itself
    # In blocks of pairs: the same per-pair norms (each row is reduced alone), without three
    # [pairs, dim] float64 temporaries (370 MB at 20,000 pairs of 768 dimensions: ~0.5 CPU-s of page faults).
    distances = np.empty(pairs, dtype=np.float64)
    for start in range(0, pairs, _PAIR_BLOCK):
        block = slice(start, start + _PAIR_BLOCK)
        distances[block] = np.linalg.norm(x[a[block]] - x[b[block]], axis=1)
    return float(np.median(distances))


def stream_width(sample: np.ndarray, k: int, target: float = STREAM_TARGET_RANDOM_COLLISION, seed: int = 0) -> float:
    """The width the daemon's sketch uses: p(d / w)^K == target at the median random-pair distance d of the
    sample, rounded to `WIDTH_DIGITS` significant digits. Deterministic for a given sample, K, target and seed."""
    distance = random_pair_distance(sample, seed=seed)
    if distance <= 0:
        raise ValueError("the calibration sample's random pairs are all identical points")
    return float(f"{width_for_collision(distance, k, target):.{WIDTH_DIGITS}g}")


def calibrate_width(embeddings: np.ndarray, k: int = 8, *, target_random: float = DEFAULT_TARGET_RANDOM_COLLISION,
                    neighbours: int = DEFAULT_NEIGHBOURS, sample_size: int = DEFAULT_SAMPLE, rows: int = 200,
                    buckets: int = 20000, seed: int = 0) -> Calibration:
    """Recommend w for K from a sample, and measure the collision rates a sketch actually has."""
    x = np.asarray(embeddings)
    rng = np.random.default_rng(seed)
    if x.shape[0] > sample_size:
        x = x[np.sort(rng.choice(x.shape[0], size=sample_size, replace=False))]
    near_d, rand_d, near_pairs, rand_pairs = distance_profile(x, neighbours, seed)
    width = width_for_collision(rand_d, k, target_random)
    sketch = RaceSketch.create(x.shape[1], rows=rows, buckets=buckets, k=k, width=width, seed=seed)
    cells = sketch.bucket_indices(x.astype(np.float32))
    xf = x.astype(np.float64)

    def measured(pairs: np.ndarray, at: float) -> float:
        dist = np.linalg.norm(xf[pairs[:, 0]] - xf[pairs[:, 1]], axis=1)
        band = pairs[np.abs(dist - at) <= 0.05 * at]  # pairs at about the median distance
        return float((cells[band[:, 0]] == cells[band[:, 1]]).mean()) if len(band) else float("nan")

    measured_near, measured_random = measured(near_pairs, near_d), measured(rand_pairs, rand_d)
    return Calibration(
        k=k, width=width, sample_size=int(x.shape[0]), near_distance=near_d, random_distance=rand_d,
        predicted_near=float(lsh_kernel(near_d, width, k)), predicted_random=float(lsh_kernel(rand_d, width, k)),
        measured_near=measured_near, measured_random=measured_random, buckets=buckets,
    )
