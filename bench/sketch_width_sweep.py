"""Coverage vs bandwidth w, with the exact LSH kernel (the sketch's R -> infinity limit).

For the three over-representation constructions of sketch_quality.py (6 topics in turn,
one seed), KL(kept || uniform) / random's at 20% keep for K in {4, 8, 16} and a w grid,
and the median kernel mass of the *other* documents (score - 1). Chose the default w.

    python bench/sketch_width_sweep.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embeddings import wiki_embeddings  # noqa: E402
from sketch_quality import KEEP, composition_metrics, topic_stream  # noqa: E402

from streamfilter.density.race import lsh_kernel  # noqa: E402
from streamfilter.policies import solve_ips_constant  # noqa: E402

GRID = {4: (0.5, 0.75, 1.0, 1.5), 8: (1.0, 1.5, 2.0, 2.5), 16: (2.0, 3.0, 4.0)}


def main() -> None:
    x, topics = wiki_embeddings()
    names = np.unique(topics)
    print("| construction | K | w | KL / random's | median mass of other documents |")
    print("|---|---|---|---|---|")
    for construction in ("distinct", "copies", "near-copies"):
        ratios: dict[tuple[int, float], list[float]] = {}
        masses: dict[tuple[int, float], list[float]] = {}
        for big in names[::2]:
            xs, labels = topic_stream(x, topics, big, construction, 0)
            d = np.sqrt(np.maximum(2 - 2 * (xs @ xs.T), 0)).astype(np.float32)
            rand = composition_metrics(np.full(len(xs), KEEP), labels, names)[0]
            for k, widths in GRID.items():
                for w in widths:
                    s = lsh_kernel(d, w, k).sum(axis=1)
                    p = np.minimum(1.0, solve_ips_constant(s, KEEP) / s)
                    ratios.setdefault((k, w), []).append(composition_metrics(p, labels, names)[0] / rand)
                    masses.setdefault((k, w), []).append(float(np.median(s) - 1))
        for (k, w), r in ratios.items():
            print(f"| {construction} | {k} | {w} | {np.mean(r):.2f} | {np.mean(masses[(k, w)]):.2f} |")


if __name__ == "__main__":
    main()
