"""Warm-up: how good are the route's first decisions, against the steady state, per `route.min_snapshot_docs`?

The route decides with the newest snapshot that covers at least `route.min_snapshot_docs`
documents; until one exists, scored documents wait in Kafka (nothing is lost). Early
decisions are made against a young sketch and a small reservoir: the IPS constant c and
the Ask-LLM quantiles are solved over what the stream has shown so far. This bench replays
that on real data with the real `SketchState`, snapshots and policies:

- the stream: all-MiniLM-L6-v2 embeddings of the Wikipedia summaries (bench/embeddings.py),
  250 documents per topic, three topics over-represented 3x, 5x and 10x by near-copies
  (jittered embeddings, cosine ~0.95), in random order; Ask-LLM scores drawn from Beta(2, 2);
- the daemon's sketch, from the default configuration (width calibrated on the stream's first
  documents, leave-one-out), and its cadence: the aggregator counts micro-batches of 64; its first snapshot is
  written as soon as it covers `min_snapshot_docs` documents, then every `--interval-docs`
  documents (the snapshot interval times the stream's rate); the route decides each
  micro-batch with the newest snapshot the aggregator has written, and the batches that
  arrived before the first snapshot with that first snapshot (they waited);
- per slice of the decisions (the first 1%, 5%, 20%, and the second half = the steady
  state): the expected keep rate (mean keep probability) and, for `density`, the KL
  divergence of the expected kept topic mix to uniform divided by random sampling's on the
  same slice. Expected values: no coin-flip noise. Averaged over `--seeds` stream orders.

    python bench/warmup.py [--thresholds 1 100 500 1000 2000 4096] [--seeds 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import wiki_embeddings  # noqa: E402

from streamfilter.density.state import SketchState  # noqa: E402
from streamfilter.policies import build_policy  # noqa: E402

BATCH = 64
SLICES = (0.01, 0.05, 0.20)
KEEP = 0.2
BOOSTS = (3, 5, 10)


def near_copy_stream(x: np.ndarray, topics: np.ndarray, seed: int, per_topic: int = 250
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, topic labels) in random order: three topics over-represented by near-copies."""
    rng = np.random.default_rng(seed)
    names = np.unique(topics)
    boosted = dict(zip(rng.choice(names, size=len(BOOSTS), replace=False), BOOSTS))
    parts, labels = [], []
    for t in names:
        e = x[rng.choice(np.flatnonzero(topics == t), per_topic, replace=False)]
        if t in boosted:
            copies = np.repeat(e, boosted[t] - 1, axis=0)
            copies = copies + 0.3 * rng.standard_normal(copies.shape).astype(np.float32) / np.sqrt(e.shape[1])
            copies /= np.linalg.norm(copies, axis=1, keepdims=True)
            e = np.concatenate([e, copies])
        parts.append(e)
        labels += [t] * len(e)
    order = rng.permutation(sum(len(p) for p in parts))
    # float16, as scored records carry them: the sketch, the reservoir and the route see the same values
    return np.concatenate(parts).astype(np.float16)[order], np.array(labels)[order]


def kl_to_uniform(p: np.ndarray, labels: np.ndarray, names: np.ndarray) -> float:
    mass = np.array([p[labels == t].sum() for t in names])
    q = mass / mass.sum()
    nz = q > 0
    return float(np.sum(q[nz] * np.log(q[nz] * len(names))))


def daemon_state(dim: int, policies) -> SketchState:
    """A `SketchState` as the daemon's aggregator builds it from the default configuration."""
    from streamfilter.config import load_config
    from streamfilter.density import race, reservoir

    s = load_config(env={}).sketch
    return SketchState.create(dim, rows=s.rows, buckets=s.buckets, k=s.k or race.DEFAULT_K, width=s.width or None,
                              seed=s.hash_seed, leave_one_out=s.leave_one_out, calibration_docs=s.calibration_docs,
                              reservoir_size=s.reservoir_size or reservoir.DEFAULT_RESERVOIR_SIZE, policies=policies)


def simulate(x: np.ndarray, labels: np.ndarray, askllm: np.ndarray, threshold: int, interval: int
             ) -> dict[str, np.ndarray]:
    """Keep probabilities [n] of `density` and `askllm+density` under the daemon's warm-up and cadence."""
    policies = {name: build_policy(name, KEEP, seed=0) for name in ("density", "askllm+density")}
    state = daemon_state(x.shape[1], list(policies.values()))
    ids = [f"doc-{i}" for i in range(len(x))]
    probs = {name: np.empty(len(x)) for name in policies}
    prepared, last_snapshot_count, waiting = None, None, []

    def decide(lo: int, hi: int) -> None:
        for name, p in prepared.items():
            probs[name][lo:hi] = [d.probability for d in p.decide(ids[lo:hi], askllm[lo:hi], x[lo:hi])]

    for lo in range(0, len(x), BATCH):
        hi = min(lo + BATCH, len(x))
        # the route decides this batch with what the aggregator has written so far
        if prepared is None:
            waiting.append((lo, hi))
        else:
            decide(lo, hi)
        state.on_batch(ids[lo:hi], x[lo:hi], askllm[lo:hi], [("t", 0, i) for i in range(lo, hi)])
        due = state.doc_count >= threshold if last_snapshot_count is None \
            else state.doc_count - last_snapshot_count >= interval
        if due:
            snapshot = state.snapshot()
            prepared = {name: policy.prepare(snapshot) for name, policy in policies.items()}
            last_snapshot_count = state.doc_count
            for a, b in waiting:  # what waited in Kafka for the first usable snapshot
                decide(a, b)
            waiting = []
    if waiting:  # a stream shorter than the threshold: decided by the final snapshot
        snapshot = state.snapshot()
        prepared = {name: policy.prepare(snapshot) for name, policy in policies.items()}
        for a, b in waiting:
            decide(a, b)
    return probs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--thresholds", type=int, nargs="+", default=[1, 100, 500, 1000, 2000, 4096])
    parser.add_argument("--interval-docs", type=int, default=1000,
                        help="documents between snapshots after the first (snapshot_interval_s x the stream's rate)")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    x_all, topics = wiki_embeddings()
    names = np.unique(topics)
    rows = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        x, labels = near_copy_stream(x_all, topics, seed)
        askllm = np.random.default_rng(100 + seed).beta(2, 2, size=len(x))
        n = len(x)
        cuts = {f"first {f:.0%}": slice(0, int(round(f * n))) for f in SLICES}
        cuts["steady (second half)"] = slice(n // 2, n)
        for threshold in args.thresholds:
            probs = simulate(x, labels, askllm, threshold, args.interval_docs)
            for cut_name, cut in cuts.items():
                rand_kl = kl_to_uniform(np.full(cut.stop - cut.start, KEEP), labels[cut], names)
                kl_ratio = kl_to_uniform(probs["density"][cut], labels[cut], names) / rand_kl
                rows.setdefault((threshold, cut_name), []).append(
                    (kl_ratio, probs["density"][cut].mean(), probs["askllm+density"][cut].mean()))
    print(f"<!-- {args.seeds} stream orders of {n} documents (12 topics x 250, three topics over-represented "
          f"{', '.join(f'{b}x' for b in BOOSTS)} by near-copies), micro-batches of {BATCH}, a snapshot every "
          f"{args.interval_docs} documents after the first; keep {KEEP:.0%}; {time.perf_counter() - t0:.0f} s -->\n")
    print("| `min_snapshot_docs` | decisions | `density` KL / random's | vs steady | `density` keep rate | "
          "`askllm+density` keep rate |")
    print("|---|---|---|---|---|---|")
    for threshold in args.thresholds:
        steady = np.mean(rows[(threshold, "steady (second half)")], axis=0)
        for cut_name in [f"first {f:.0%}" for f in SLICES] + ["steady (second half)"]:
            kl, keep_d, keep_q = np.mean(rows[(threshold, cut_name)], axis=0)
            print(f"| {threshold} | {cut_name} | {kl:.2f} | {kl / steady[0]:.2f}x | {keep_d:.3f} | {keep_q:.3f} |")


if __name__ == "__main__":
    main()
