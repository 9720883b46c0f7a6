"""Density fidelity (issue 13): the daemon's sketch (calibrated width, leave-one-out) against
the old defaults, the exact sums of its own kernel and an exact Gaussian KDE, on real embeddings.

Embeddings: all-MiniLM-L6-v2 (384-d) or all-mpnet-base-v2 (768-d) of the ~10k Wikipedia
summaries (bench/embeddings.py caches them; mpnet must be fetched first, see there).

Each stream is shuffled; the new sketch's width is calibrated, as the daemon does, on the
stream's first 1000 documents (calibrate.stream_width). Keep probabilities are IPS,
min(1, c / score) with c solved over the whole stream; the kept topic composition is the
expected one (no coin-flip noise). Constructions (12 topics):

- near-copies: 200 documents of every topic; three topics boosted 3x, 5x and 10x by jittered
  copies of their documents (the original plus f - 1 copies, each + noise * N(0, I/d), then
  re-normalised: noise 0.2 is cosine ~0.98 to the original, 0.3 ~0.96, 0.4 ~0.93), two sets of
  boosted topics; and the issue-8 bench's one topic 20x at noise 0.3 (three topics in turn).
- copies: as near-copies, exact copies.
- distinct: three topics with 3-4x more *different* documents (60 per other topic), two
  sets; and the issue-8 bench's construction (one topic complete, 1/20 of it from each
  other topic; six topics in turn).

Kendall tau: on all ~10k documents, the sketch's density score against exact Gaussian KDEs at
three bandwidths (sigma 0.3, 0.4, 0.5 times the embedder's median random-pair distance / 1.39,
MiniLM's, so both embedders get the same relative bandwidths).

"alternatives" (the choice): IPS on the exact sums of other kernels on the same constructions
(15% keep): single LSH kernels at several K and random-pair collision targets, two-scale
kernels (each scale's sum divided by its mean over the stream, then added, or multiplied
under a square root), and the leave-one-out kernel at several targets.

    python bench/density_fidelity.py --model minilm
    python bench/density_fidelity.py --model mpnet
    python bench/density_fidelity.py --model minilm --only alternatives
    python bench/density_fidelity.py --model minilm --only rows      # tau against R and B: what tau costs

"rows": the daemon's kernel (calibrated width, leave-one-out) at more rows and buckets, to
show what Kendall tau is limited by: the rows (LSH sampling noise), not the buckets.
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

from streamfilter.density.calibrate import (  # noqa: E402
    DEFAULT_CALIBRATION_DOCS, STREAM_TARGET_RANDOM_COLLISION, random_pair_distance, stream_width)
from streamfilter.density.race import DEFAULT_K, DEFAULT_WIDTH, SCORE_FLOOR, RaceSketch, lsh_kernel  # noqa: E402
from streamfilter.policies import solve_ips_constant  # noqa: E402

MINILM_RANDOM_DISTANCE = 1.39
SIGMAS = (0.3, 0.4, 0.5)
KEEPS = (0.15, 0.2)
GRID_STEPS = 4000  # exact kernels through a lookup table over distance, 1/4000 apart


def lookup_sums(q: np.ndarray, x: np.ndarray, kernels: dict[str, callable], block: int = 1500) -> dict[str, np.ndarray]:
    """[n_q] sums over x of each kernel f(||q - x||) (unit-norm inputs), via a distance grid."""
    grid = np.arange(2 * GRID_STEPS + 1) / GRID_STEPS
    tables = {name: f(grid).astype(np.float32) for name, f in kernels.items()}
    out = {name: np.zeros(len(q)) for name in kernels}
    for lo in range(0, len(q), block):
        d = np.sqrt(np.maximum(2.0 - 2.0 * (q[lo:lo + block] @ x.T), 0.0))
        idx = np.minimum(np.rint(d * GRID_STEPS), 2 * GRID_STEPS).astype(np.int16)
        for name, table in tables.items():
            out[name][lo:lo + block] = np.take(table, idx).sum(axis=1, dtype=np.float64)
    return out


def gaussian(sigma: float):
    return lambda d: np.exp(-(d * d) / (2 * sigma * sigma))


def sketch_scores(xs: np.ndarray, width: float, leave_one_out: bool, seed: int) -> np.ndarray:
    sketch = RaceSketch.create(xs.shape[1], k=DEFAULT_K, width=width, seed=seed, leave_one_out=leave_one_out)
    sketch.add(xs)
    return sketch.query(xs)


def stream(x, topics, names, kind: str, bigs, boosts, noise: float, base: int, seed: int):
    """(embeddings, labels) of one construction, shuffled (module docstring)."""
    rng = np.random.default_rng(seed)
    parts, labels = [], []
    for t in names:
        pool = np.flatnonzero(topics == t)
        f = boosts[list(bigs).index(t)] if t in bigs else 1
        if kind == "distinct":
            e = x[rng.choice(pool, min(len(pool), base * f), replace=False)]
        else:
            e = np.repeat(x[rng.choice(pool, base, replace=False)], f, axis=0)
            if f > 1 and noise > 0:
                e = e.copy()
                jitter = np.tile(np.arange(f) > 0, base)  # the original stays, its copies move
                shift = rng.standard_normal((int(jitter.sum()), x.shape[1])).astype(np.float32)
                e[jitter] += noise * shift / np.sqrt(x.shape[1])
                e /= np.linalg.norm(e, axis=1, keepdims=True)
        parts.append(e)
        labels += [t] * len(e)
    xs, lab = np.concatenate(parts).astype(np.float32), np.array(labels)
    order = rng.permutation(len(xs))
    return xs[order], lab[order]


def bench8_distinct(x, topics, names, big, seed: int):
    """The issue-8 bench's "distinct": every document of `big`, 1/20 as many of each other topic."""
    rng = np.random.default_rng(seed)
    big_idx = np.flatnonzero(topics == big)
    idx = np.concatenate([big_idx] + [rng.choice(np.flatnonzero(topics == t), len(big_idx) // 20, replace=False)
                                      for t in names if t != big])
    idx = idx[rng.permutation(len(idx))]
    return x[idx], topics[idx]


def kl_ratio(p: np.ndarray, labels: np.ndarray, names: np.ndarray, keep: float) -> float:
    def kl(prob):
        mass = np.array([prob[labels == t].sum() for t in names])
        q = mass / mass.sum()
        q = q[q > 0]
        return float(np.sum(q * np.log(q * len(names))))
    return kl(p) / kl(np.full(len(p), keep))


def cases_for(names: np.ndarray) -> list[tuple]:
    names = np.asarray(names)
    sets = [tuple(names[[0, 4, 8]]), tuple(names[[2, 6, 10]])]
    cases = []
    for si, bigs in enumerate(sets):
        for noise in (0.2, 0.3, 0.4):
            cases.append((f"near-copies, noise {noise}, 3/5/10x", "near", bigs, (3, 5, 10), noise, 200, si))
        cases.append(("copies, 3/5/10x", "copies", bigs, (3, 5, 10), 0.0, 200, si))
        cases.append(("distinct, 3/3/4x", "distinct", bigs, (3, 3, 4), 0.0, 60, si))
    for ti, big in enumerate(names[[1, 5, 9]]):
        cases.append(("near-copies, noise 0.3, one topic 20x (issue 8)", "near", (big,), (20,), 0.3, 200, 10 + ti))
    for ti, big in enumerate(names[::2]):
        cases.append(("distinct, one topic complete (issue 8)", "bench8", (big,), (), 0.0, 0, 20 + ti))
    return cases


def build(x, topics, names, case):
    label, kind, bigs, boosts, noise, base, seed = case
    if kind == "bench8":
        return bench8_distinct(x, topics, names, bigs[0], seed)
    return stream(x, topics, names, kind, bigs, boosts, noise, base, seed)


def coverage(x, topics, sigma_scale: float) -> None:
    names = np.unique(topics)
    cases = cases_for(names)
    rows: dict[tuple[str, float], dict[str, list[float]]] = {}
    widths: list[float] = []
    t0 = time.perf_counter()
    for case in cases:
        label, seed = case[0], case[-1]
        xs, lab = build(x, topics, names, case)
        width = stream_width(xs[:DEFAULT_CALIBRATION_DOCS], DEFAULT_K)  # what the daemon does
        widths.append(width)
        scores = {"random": None,
                  f"old default: sketch K=8 w={DEFAULT_WIDTH}": sketch_scores(xs, DEFAULT_WIDTH, False, seed),
                  "new default: sketch K=8 calibrated w, leave-one-out": sketch_scores(xs, width, True, seed)}
        exact = lookup_sums(xs, xs, {"lsh": lambda d: lsh_kernel(d, width, DEFAULT_K),
                                     **{f"g{s}": gaussian(s * sigma_scale) for s in SIGMAS}})
        scores["exact sums of the new kernel, leave-one-out"] = np.maximum(exact["lsh"] - 1.0, SCORE_FLOOR)
        for s in SIGMAS:
            scores[f"exact Gaussian KDE sigma={s * sigma_scale:.2f}"] = exact[f"g{s}"]
        new = scores["new default: sketch K=8 calibrated w, leave-one-out"]
        for keep in KEEPS:
            for name, sc in scores.items():
                p = np.full(len(xs), keep) if sc is None else np.minimum(1.0, solve_ips_constant(sc, keep) / sc)
                rows.setdefault((label, keep), {}).setdefault(name, []).append(kl_ratio(p, lab, names, keep))
            # the paper's other density baselines (policies density-top / density-bottom) on the new sketch
            top = (new >= np.quantile(new, 1.0 - keep)).astype(np.float64)
            bottom = (new <= np.quantile(new, keep)).astype(np.float64)
            rows[(label, keep)].setdefault("density-top (new sketch)", []).append(kl_ratio(top, lab, names, keep))
            rows[(label, keep)].setdefault("density-bottom (new sketch)", []).append(kl_ratio(bottom, lab, names, keep))
    print(f"\n<!-- calibrated widths over the streams: {min(widths):.3f} .. {max(widths):.3f}; "
          f"{time.perf_counter() - t0:.0f} s -->")
    methods = list(next(iter(rows.values())))
    print("\n| construction | keep | " + " | ".join(methods[1:]) + " |")
    print("|---|---|" + "---|" * (len(methods) - 1))
    for (label, keep), vals in rows.items():
        print(f"| {label} | {keep:.0%} | " + " | ".join(f"{np.mean(vals[m]):.2f} ({np.max(vals[m]):.2f})"
                                                     for m in methods[1:]) + " |")
    print("\n(KL(kept topics ‖ uniform) / random's: mean over the construction's cases (worst case); random = 1.00)")


def alternatives(x, topics, keep: float = 0.15) -> None:
    """KL / random's of IPS on exact kernel sums: the kernels measured before choosing (module docstring)."""
    names = np.unique(topics)
    single = [(8, 3e-5), (8, 1e-4), (8, 5e-4), (16, 3e-5), (16, 1e-4), (32, 1e-4)]
    pairs = [((8, 1e-4), (8, 5e-3)), ((8, 1e-5), (8, 5e-4)), ((16, 1e-5), (16, 5e-4))]
    loo = [(8, 2e-5), (8, 3e-5), (8, 5e-5), (8, 1e-4), (8, 2e-4), (16, 1e-4)]
    rows: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for case in cases_for(names):
        xs, lab = build(x, topics, names, case)
        head = xs[:DEFAULT_CALIBRATION_DOCS]
        kt = sorted(set(single) | {a for p in pairs for a in p} | set(loo))
        widths = {(k, t): stream_width(head, k, t) for k, t in kt}
        sums = lookup_sums(xs, xs, {kt_: (lambda d, w=w, k=kt_[0]: lsh_kernel(d, w, k)) for kt_, w in widths.items()})
        scores = {f"K={k}, target {t:g}": sums[(k, t)] for k, t in single}
        for a, b in pairs:
            na, nb = sums[a] / sums[a].mean(), sums[b] / sums[b].mean()
            scores[f"K={a[0]} {a[1]:g} + {b[1]:g}, sum"] = na + nb
            scores[f"K={a[0]} {a[1]:g} + {b[1]:g}, geometric"] = np.sqrt(na * nb)
        for k, t in loo:
            scores[f"leave-one-out K={k}, target {t:g}"] = np.maximum(sums[(k, t)] - 1.0, SCORE_FLOOR)
        for name, sc in scores.items():
            p = np.minimum(1.0, solve_ips_constant(sc, keep) / sc)
            rows.setdefault(name, {}).setdefault(case[0], []).append(kl_ratio(p, lab, names, keep))
    labels = list(next(iter(rows.values())))
    print(f"\n<!-- alternatives: exact kernel sums, keep {keep:.0%}; {time.perf_counter() - t0:.0f} s -->")
    print("\n| kernel (exact sums) | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name, vals in rows.items():
        print(f"| {name} | " + " | ".join(f"{np.mean(vals[c]):.2f}" for c in labels) + " |")


def stability(x, draws: int = 20) -> None:
    """The calibrated width from n random documents, over `draws` draws: how early a snapshot may calibrate."""
    rng = np.random.default_rng(0)
    print(f"\n| documents calibrated on | calibrated w, min .. max over {draws} draws | median |")
    print("|---|---|---|")
    for n in (8, 32, 128, 512, DEFAULT_CALIBRATION_DOCS):
        ws = [stream_width(x[rng.choice(len(x), n, replace=False)], DEFAULT_K) for _ in range(draws)]
        print(f"| {n} | {min(ws):.3f} .. {max(ws):.3f} | {np.median(ws):.3f} |")


def fidelity(x, sigma_scale: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    xs = x[rng.permutation(len(x))]
    width = stream_width(xs[:DEFAULT_CALIBRATION_DOCS], DEFAULT_K)
    t0 = time.perf_counter()
    exact = lookup_sums(xs, xs, {"new": lambda d: lsh_kernel(d, width, DEFAULT_K),
                                 "old": lambda d: lsh_kernel(d, DEFAULT_WIDTH, DEFAULT_K),
                                 **{f"g{s}": gaussian(s * sigma_scale) for s in SIGMAS}})
    print(f"\n<!-- exact kernel sums over {len(xs)}^2 pairs: {time.perf_counter() - t0:.0f} s; "
          f"calibrated w = {width} -->")
    cases = {
        f"old default (K=8, w={DEFAULT_WIDTH}, R=1000)": (sketch_scores(xs, DEFAULT_WIDTH, False, seed), exact["old"]),
        f"new default (K=8, w={width}, leave-one-out, R=1000)": (sketch_scores(xs, width, True, seed), exact["new"] - 1),
        "exact sums of the new kernel (R -> infinity)": (exact["new"] - 1, exact["new"] - 1),
    }
    wide = RaceSketch.create(xs.shape[1], rows=4000, k=DEFAULT_K, width=width, seed=seed, leave_one_out=True)
    wide.add(xs)
    cases["new kernel, R=4000 (4x the hashing)"] = (wide.query(xs), exact["new"] - 1)
    for target in (3e-5, 5e-5):  # narrower kernels (what the coverage tables trade against)
        w = stream_width(xs[:DEFAULT_CALIBRATION_DOCS], DEFAULT_K, target)
        cases[f"leave-one-out, target {target:g} (w={w}), R=1000"] = (sketch_scores(xs, w, True, seed), None)
    print(f"\n| score (N = {len(xs)}) | tau vs its exact kernel | "
          + " | ".join(f"tau vs Gaussian sigma={s * sigma_scale:.2f}" for s in SIGMAS) + " | median score / exact |")
    print("|---|---|" + "---|" * len(SIGMAS) + "---|")
    for name, (est, ex) in cases.items():
        taus = [kendalltau(est, exact[f"g{s}"]).statistic for s in SIGMAS]
        own = "" if ex is None else f"{kendalltau(est, ex).statistic:.3f}"
        ratio = "" if ex is None else f"{np.median(est / np.maximum(ex, SCORE_FLOOR)):.3f}"
        print(f"| {name} | {own} | " + " | ".join(f"{t:.3f}" for t in taus) + f" | {ratio} |")


ROW_SWEEP = ((1000, 20000), (1000, 200000), (2000, 20000), (4000, 5000), (4000, 20000), (8000, 20000), (16000, 20000))


def rows_sweep(x, sigma_scale: float, seed: int = 0) -> None:
    """Kendall tau of the daemon's kernel against the Gaussian KDEs at more rows R and buckets B."""
    rng = np.random.default_rng(seed)
    xs = x[rng.permutation(len(x))]
    width = stream_width(xs[:DEFAULT_CALIBRATION_DOCS], DEFAULT_K)
    exact = lookup_sums(xs, xs, {f"g{s}": gaussian(s * sigma_scale) for s in SIGMAS})
    print(f"\n| sketch (K=8, w={width}, leave-one-out) | counters (MB, int32) | hashing per document vs R=1000 | "
          + " | ".join(f"tau vs Gaussian sigma={s * sigma_scale:.2f}" for s in SIGMAS) + " |")
    print("|---|---|---|" + "---|" * len(SIGMAS))
    for rows, buckets in ROW_SWEEP:
        sketch = RaceSketch.create(xs.shape[1], rows=rows, buckets=buckets, k=DEFAULT_K, width=width, seed=seed,
                                   leave_one_out=True)
        for i in range(0, len(xs), 2048):
            sketch.add(xs[i:i + 2048])
        est = np.concatenate([sketch.query(xs[i:i + 1024]) for i in range(0, len(xs), 1024)])
        taus = [kendalltau(est, exact[f"g{s}"]).statistic for s in SIGMAS]
        print(f"| R={rows}, B={buckets} | {rows * buckets * 4 / 1e6:.0f} | {rows / 1000:g}x | "
              + " | ".join(f"{t:.3f}" for t in taus) + " |")
        del sketch
    # A wider kernel collides more often per row (less relative noise) but its heavy tails fit the
    # Gaussian worse: the other way to buy tau at R = 1000.
    print("\n| R=1000, B=20000, random-pair collision target | width | "
          + " | ".join(f"tau vs Gaussian sigma={s * sigma_scale:.2f}" for s in SIGMAS) + " |")
    print("|---|---|" + "---|" * len(SIGMAS))
    for target in (STREAM_TARGET_RANDOM_COLLISION, 1e-3, 3e-3, 1e-2, 3e-2):
        w = stream_width(xs[:DEFAULT_CALIBRATION_DOCS], DEFAULT_K, target)
        est = sketch_scores(xs, w, True, seed)
        taus = [kendalltau(est, exact[f"g{s}"]).statistic for s in SIGMAS]
        print(f"| {target:g} | {w} | " + " | ".join(f"{t:.3f}" for t in taus) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--only", nargs="*", default=["tau", "coverage"], choices=["coverage", "tau", "alternatives", "stability", "rows"])
    args = parser.parse_args()
    x, topics = wiki_embeddings(model=args.model)
    rand_d = random_pair_distance(x[np.random.default_rng(0).choice(len(x), 2000, replace=False)])
    sigma_scale = rand_d / MINILM_RANDOM_DISTANCE
    print(f"<!-- {args.model}: {len(x)} embeddings, dim {x.shape[1]}, {len(np.unique(topics))} topics; median "
          f"random-pair distance {rand_d:.3f}; calibration target {STREAM_TARGET_RANDOM_COLLISION:g} -->")
    if "tau" in args.only:
        fidelity(x, sigma_scale)
    if "coverage" in args.only:
        coverage(x, topics, sigma_scale)
    if "alternatives" in args.only:
        alternatives(x, topics)
    if "stability" in args.only:
        stability(x)
    if "rows" in args.only:
        rows_sweep(x, sigma_scale)


if __name__ == "__main__":
    main()
