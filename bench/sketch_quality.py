"""Density sketch quality on real embeddings: Kendall tau vs exact kernels, and topic coverage.

all-MiniLM-L6-v2 embeddings of the ~10k Wikipedia summaries (bench/embeddings.py caches them).

1. Estimator quality: sketch scores vs the exact LSH kernel sum sum_x p(||x-q||/w)^K (what the
   sketch estimates) and vs an exact Gaussian KDE, Kendall tau, for R in {10, 100, 1000} and
   K in {1, 4, 8, 16} (w calibrated per K), plus a w sweep at the default K.
2. Coverage: streams where one topic is over-represented 20x (each of the 12 topics in turn,
   3 seeds); keep 20%; KL divergence of the kept topic distribution from uniform, and its
   normalised entropy, for random sampling, IPS with the sketch (several K; debiased or not),
   IPS with the exact LSH kernel, and IPS with an exact Gaussian KDE (the ceiling).
   Kept compositions are expected values (sum of keep probabilities per topic), so the
   figures carry no coin-flip noise.

    python bench/sketch_quality.py            # prints markdown tables
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import wiki_embeddings  # noqa: E402

from streamfilter.density.calibrate import DEFAULT_TARGET_RANDOM_COLLISION, distance_profile, width_for_collision  # noqa: E402
from streamfilter.density.race import DEFAULT_BUCKETS, DEFAULT_K, DEFAULT_WIDTH, SCORE_FLOOR, RaceSketch, lsh_kernel  # noqa: E402
from streamfilter.policies import solve_ips_constant  # noqa: E402

KEEP = 0.2
OVER = 20


def pairwise_kernel_sums(x: np.ndarray, y: np.ndarray, kernels: dict[str, callable], block: int = 1000) -> dict[str, np.ndarray]:
    """For each named kernel f(distance): [n_y] sums over x of f(||x - y||), blockwise (unit-norm inputs)."""
    out = {name: np.zeros(len(y)) for name in kernels}
    for lo in range(0, len(y), block):
        d = np.sqrt(np.maximum(2.0 - 2.0 * (y[lo:lo + block] @ x.T), 0.0)).astype(np.float64)
        for name, f in kernels.items():
            out[name][lo:lo + block] = f(d).sum(axis=1)
    return out


def gaussian(sigma: float):
    return lambda d: np.exp(-(d * d) / (2 * sigma * sigma))


def sketch_row_hits(x: np.ndarray, k: int, width: float, rows: int = 1000, buckets: int = DEFAULT_BUCKETS,
                    seed: int = 0) -> tuple[np.ndarray, int]:
    """Per-row counter hits [n, rows] of x queried against a sketch of x (so R-subsets are prefixes)."""
    sketch = RaceSketch.create(x.shape[1], rows=rows, buckets=buckets, k=k, width=width, seed=seed)
    sketch.add(x)
    cells = sketch.bucket_indices(x)
    return sketch.counters[np.arange(rows)[None, :], cells], sketch.count


def debiased(hits: np.ndarray, n: int, buckets: int, rows: int | None = None, debias: bool = True) -> np.ndarray:
    raw = hits[:, :rows].mean(axis=1) if rows else hits.mean(axis=1)
    if not debias:
        return raw
    return np.maximum((raw - n / buckets) / (1 - 1 / buckets), SCORE_FLOOR)


def estimator_quality(x: np.ndarray, widths: dict[int, float]) -> None:
    sigmas = (0.3, 0.4, 0.5)
    kernels = {f"lsh:K={k}": (lambda d, k=k: lsh_kernel(d, widths[k], k)) for k in widths}
    kernels.update({f"gauss:{s}": gaussian(s) for s in sigmas})
    w_sweep = (1.0, 1.5, 2.0, 2.5)
    kernels.update({f"lsh:K={DEFAULT_K},w={w}": (lambda d, w=w: lsh_kernel(d, w, DEFAULT_K)) for w in w_sweep})
    t0 = time.perf_counter()
    exact = pairwise_kernel_sums(x, x, kernels)
    print(f"<!-- exact kernel sums over {len(x)}^2 pairs: {time.perf_counter() - t0:.0f} s -->")
    print("\n### Kendall tau: sketch score vs exact kernel sums (N = %d, B = %d)\n" % (len(x), DEFAULT_BUCKETS))
    print("| K | w | R | tau vs exact LSH kernel | " + " | ".join(f"tau vs Gaussian KDE sigma={s}" for s in sigmas) + " |")
    print("|---|---|---|---|" + "---|" * len(sigmas))
    for k, w in widths.items():
        hits, n = sketch_row_hits(x, k, w)
        for rows in (10, 100, 1000):
            est = debiased(hits, n, DEFAULT_BUCKETS, rows)
            taus = [kendalltau(est, exact[f"gauss:{s}"]).statistic for s in sigmas]
            print(f"| {k} | {w:.3f} | {rows} | {kendalltau(est, exact[f'lsh:K={k}']).statistic:.3f} | "
                  + " | ".join(f"{t:.3f}" for t in taus) + " |")
    print(f"\n### Width sweep at K = {DEFAULT_K}, R = 1000\n")
    print("| w | tau vs exact LSH kernel | " + " | ".join(f"tau vs Gaussian sigma={s}" for s in sigmas) + " |")
    print("|---|---|" + "---|" * len(sigmas))
    for w in w_sweep:
        hits, n = sketch_row_hits(x, DEFAULT_K, w)
        est = debiased(hits, n, DEFAULT_BUCKETS)
        taus = [kendalltau(est, exact[f"gauss:{s}"]).statistic for s in sigmas]
        print(f"| {w} | {kendalltau(est, exact[f'lsh:K={DEFAULT_K},w={w}']).statistic:.3f} | "
              + " | ".join(f"{t:.3f}" for t in taus) + " |")


def topic_stream(x: np.ndarray, topics: np.ndarray, big: str, construction: str, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, topic labels) of a stream in which topic `big` is over-represented OVERx.

    - "distinct": every document of `big`, and 1/OVER as many distinct documents of each other
      topic. The over-represented topic brings OVERx more *different* documents.
    - "copies": 200 documents of every topic; each of `big`'s appears OVER times (mirrors,
      syndication: identical text, identical embedding).
    - "near-copies": as "copies", each copy's embedding jittered (Gaussian, norm ~0.3, then
      re-normalised: cosine ~0.95 to the original), like templated or lightly edited pages.
    """
    rng = np.random.default_rng(seed)
    names = np.unique(topics)
    if construction == "distinct":
        big_idx = np.flatnonzero(topics == big)
        per_other = max(1, len(big_idx) // OVER)
        parts = [big_idx] + [rng.choice(np.flatnonzero(topics == t), per_other, replace=False)
                             for t in names if t != big]
        idx = np.concatenate(parts)
        return x[idx], topics[idx]
    parts, labels = [], []
    for t in names:
        idx = rng.choice(np.flatnonzero(topics == t), 200, replace=False)
        e = x[idx]
        if t == big:
            e = np.repeat(e, OVER, axis=0)
            if construction == "near-copies":
                e = e + 0.3 * rng.standard_normal(e.shape).astype(np.float32) / np.sqrt(e.shape[1])
                e /= np.linalg.norm(e, axis=1, keepdims=True)
        parts.append(e)
        labels += [t] * len(e)
    return np.concatenate(parts).astype(np.float32), np.array(labels)


def composition_metrics(p: np.ndarray, labels: np.ndarray, names: np.ndarray) -> tuple[float, float]:
    """(KL(kept || uniform), normalised entropy) of the expected kept topic composition."""
    mass = np.array([p[labels == t].sum() for t in names])
    q = mass / mass.sum()
    nz = q > 0
    kl = float(np.sum(q[nz] * np.log(q[nz] * len(names))))
    ent = float(-np.sum(q[nz] * np.log(q[nz])) / np.log(len(names)))
    return kl, ent


def coverage(x: np.ndarray, topics: np.ndarray, widths: dict[int, float], construction: str,
             bigs: np.ndarray, seeds: int = 1) -> None:
    names = np.unique(topics)
    methods: dict[str, list[tuple[float, float]]] = {}
    sigma_grid = (0.3, 0.4, 0.5)
    small_b = 100  # a long stream's situation: N/B ~ 10-60, spurious mass dominates unless subtracted
    t0 = time.perf_counter()
    for big in bigs:
        for seed in range(seeds):
            xs, labels = topic_stream(x, topics, big, construction, seed)
            scores: dict[str, np.ndarray | None] = {"random": None}
            for k, w in widths.items():
                hits, n = sketch_row_hits(xs, k, w, seed=seed)
                scores[f"sketch K={k} w={w:.2f}"] = debiased(hits, n, DEFAULT_BUCKETS)
                if k == DEFAULT_K:
                    hits_b, n_b = sketch_row_hits(xs, k, w, buckets=small_b, seed=seed)
                    scores[f"sketch K={k} w={w:.2f}, B={small_b}, debiased"] = debiased(hits_b, n_b, small_b)
                    scores[f"sketch K={k} w={w:.2f}, B={small_b}, NOT debiased"] = debiased(hits_b, n_b, small_b, debias=False)
            kernels = {f"exact LSH kernel K={DEFAULT_K} w={widths[DEFAULT_K]:.2f}":
                       (lambda d: lsh_kernel(d, widths[DEFAULT_K], DEFAULT_K))}
            kernels.update({f"exact Gaussian KDE sigma={s}": gaussian(s) for s in sigma_grid})
            scores.update(pairwise_kernel_sums(xs, xs, kernels))
            for name, s in scores.items():
                p = np.full(len(xs), KEEP) if s is None else np.minimum(1.0, solve_ips_constant(s, KEEP) / s)
                methods.setdefault(name, []).append(composition_metrics(p, labels, names))
    rand_kl = np.mean([m[0] for m in methods["random"]])
    print(f"\n### Coverage, \"{construction}\": one topic over-represented {OVER}x, keep {KEEP:.0%} "
          f"(over-represented topic in turn: {len(bigs)} topics x {seeds} seed(s); expected kept composition; "
          f"{time.perf_counter() - t0:.0f} s)\n")
    print("| sampler | KL(kept ‖ uniform) | KL / random's | normalised entropy |")
    print("|---|---|---|---|")
    for name, vals in methods.items():
        kl = np.mean([v[0] for v in vals])
        ent = np.mean([v[1] for v in vals])
        print(f"| {name} | {kl:.3f} | {kl / rand_kl:.2f} | {ent:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-tau", action="store_true")
    parser.add_argument("--skip-coverage", action="store_true")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--constructions", nargs="+", default=["distinct", "copies", "near-copies"])
    args = parser.parse_args()
    x, topics = wiki_embeddings()
    print(f"<!-- {len(x)} MiniLM embeddings, dim {x.shape[1]}, {len(np.unique(topics))} topics -->")
    near_d, rand_d, _, _ = distance_profile(x[np.random.default_rng(0).choice(len(x), 2000, replace=False)])
    widths = {k: width_for_collision(rand_d, k, DEFAULT_TARGET_RANDOM_COLLISION) for k in (1, 4, 8, 16)}
    widths[1] = 1.0  # calibration is meaningless at K=1 (it asks for a tiny w: only self-collisions); w=1 on unit vectors
    widths[DEFAULT_K] = DEFAULT_WIDTH  # the shipped default (calibration gives ~ the same on this data)
    print(f"<!-- median 10-NN distance {near_d:.3f}, median random-pair distance {rand_d:.3f}; "
          f"calibrated w per K: {', '.join(f'K={k}: {width_for_collision(rand_d, k, DEFAULT_TARGET_RANDOM_COLLISION):.3f}' for k in (1, 4, 8, 16))} -->")
    if not args.skip_tau:
        estimator_quality(x, widths)
    if not args.skip_coverage:
        bigs = np.unique(topics)[::2]  # 6 of the 12 topics over-represented in turn
        for construction in args.constructions:
            coverage(x, topics, widths, construction, bigs, seeds=args.seeds)


if __name__ == "__main__":
    main()
