"""Fixtures for the density tests: synthetic clustered embeddings, and the real MiniLM ones (cached)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def clustered(n: int, dim: int = 32, clusters: int = 6, spread: float = 0.25, seed: int = 0,
              weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm points around `clusters` random centres; (embeddings float32 [n, dim], labels [n])."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    labels = rng.choice(clusters, size=n, p=p)
    x = centres[labels] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


@pytest.fixture(scope="session")
def wiki():
    """(embeddings [n, 384] float32, topics [n]) of the Wikipedia summaries; builds the cache if missing."""
    from embeddings import wiki_embeddings

    return wiki_embeddings()


@pytest.fixture(scope="session")
def make_clustered():
    return clustered
