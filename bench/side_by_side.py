"""The score stage's two models one after the other, or side by side on the shared inference workers.

The bare scorers (flan-t5-small + sentence-t5-base architectures, random weights, int8, the default
layout: one single-threaded worker per core, both models on the process's one pool of them) called
on N random documents of the web mix at a time, as the score stage calls them per micro-batch: at
low load its micro-batches hold a few documents, under a backlog up to `max_batch_docs`. For each N,
`--calls` calls, each timed both ways back to back in a random order (so that the machine's drift
falls on both); mean and p90 seconds per call.

    .venv/bin/python bench/side_by_side.py [--calls 30] [--sizes 1,2,4,8,32,128]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from models_cpu import build, document_sets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--sizes", default="1,2,4,8,32,128")
    args = parser.parse_args()
    from streamfilter.models import AskLLMScorer, SentenceEmbedder
    from streamfilter.models.base import run_side_by_side

    root = REPO / ".cache" / "bench-models"
    scorer = AskLLMScorer.load(build("flan-t5-small", root)[1], variant="int8")
    embedder = SentenceEmbedder.load(build("sentence-t5-base", root)[1], variant="int8", dtype="float16")
    mix = document_sets(0, 1000)["web mix"]
    scorer.score(mix[:32], batch_size=32)  # warm-up
    embedder.embed(mix[:32], batch_size=32)

    def one_after_the_other(texts):
        scorer.score(texts, batch_size=32)
        embedder.embed(texts, batch_size=32)

    def side_by_side(texts):
        run_side_by_side({"askllm": lambda: scorer.score(texts, batch_size=32),
                          "embedder": lambda: embedder.embed(texts, batch_size=32)})

    modes = {"one after the other": one_after_the_other, "side by side": side_by_side}
    rng = random.Random(1)
    print(f"{len(os.sched_getaffinity(0))} cores, {scorer.workers} inference workers; seconds per call, mean (p90)")
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        calls = max(3, args.calls if n <= 8 else args.calls * 8 // n)
        took = {name: [] for name in modes}
        for _ in range(calls):
            texts = rng.sample(mix, n)
            for name in rng.sample(list(modes), len(modes)):
                t0 = time.perf_counter()
                modes[name](texts)
                took[name].append(time.perf_counter() - t0)
        row = {"docs": n, "calls": calls, **{name: {"mean_s": round(float(np.mean(v)), 4),
                                                    "p90_s": round(float(np.percentile(v, 90)), 4)}
                                             for name, v in took.items()}}
        rows.append(row)
        a, b = (row[name] for name in modes)
        print(f"  {n:4d} docs ({calls} calls): one after the other {a['mean_s']:.3f} ({a['p90_s']:.3f}), "
              f"side by side {b['mean_s']:.3f} ({b['p90_s']:.3f}): {b['mean_s'] / a['mean_s']:.2f}x", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
