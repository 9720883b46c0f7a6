"""What the score stage needs of a model: the three signals, as protocols (any object with these members).

`loader.load_model` returns classes that satisfy them (`AskLLMScorer` and `CausalAskLLMScorer`
are `QualityScorer`s, `SentenceEmbedder` an `Embedder`, `PerplexityScorer` a `PerplexityModel`);
tests pass small fakes. `model_id` ("name@sha256 prefix of the graph") goes into every scored
record, so scores of different models are never mixed.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class QualityScorer(Protocol):
    """Ask-LLM: P("yes" | the paper's prompt around the document)."""

    model_id: str

    def score(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray:
        """float32 [len(texts)] in [0, 1]; input order kept."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """Sentence embeddings for the density sketch."""

    model_id: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray:
        """[len(texts), dim] L2-normalised rows (float32 or float16); input order kept."""
        ...


@runtime_checkable
class PerplexityModel(Protocol):
    """The paper's perplexity baseline: mean per-token NLL under a causal LM."""

    model_id: str

    def mean_nll(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray:
        """float32 [len(texts)], nats per token (NaN for a text with no tokens); input order kept."""
        ...
