"""The paper's perplexity baseline (section B.5): mean per-token NLL of a document under a causal LM.

A document is scored as the LM saw documents in pre-training: its tokens after a
document-start token (BOS, or <|endoftext|> for models without one), truncated to
`max_tokens`. The graph (`graphs.heads.perplexity_graph`) returns only the per-document sum of
token NLLs and the number of predicted tokens; the score is their ratio (log perplexity;
perplexity = exp). Lower is "better" by this criterion; the `perplexity` policy keeps the
lowest fraction.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from streamfilter.errors import ConfigError
from streamfilter.models.base import DEFAULT_MAX_TOKENS, OnnxTextModel
from streamfilter.models.manifest import Manifest
from streamfilter.models.text import encode_bounded


class PerplexityScorer(OnnxTextModel):
    """Scores documents with their mean per-token NLL. Load with `PerplexityScorer.load(model_dir)`."""

    KIND = "perplexity"

    def __init__(self, manifest: Manifest, session, tokenizer, *, variant: str, max_tokens: int = DEFAULT_MAX_TOKENS):
        if max_tokens < 2:
            raise ConfigError(f"max_tokens: perplexity needs at least 2 tokens, got {max_tokens}")
        super().__init__(manifest, session, tokenizer, variant=variant, max_tokens=max_tokens)
        self.start_token_id: int = manifest.config["document_start_token_id"]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """[start] + the document's first max_tokens - 1 tokens, per text."""
        return [[self.start_token_id] + d for d in encode_bounded(self.tokenizer, texts, self.max_tokens - 1)]

    def nll(self, texts: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(Σ token NLL, number of predicted tokens), float32 [n] each."""
        sums, counts = self.run_batched(self.token_ids(texts), batch_size, [((), np.float32), ((), np.float32)])
        return sums, counts

    def mean_nll(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Mean per-token NLL in nats (log perplexity), float32 [n]; NaN for a text with no tokens."""
        sums, counts = self.nll(texts, batch_size=batch_size)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)

    def perplexity(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        return np.exp(self.mean_nll(texts, batch_size=batch_size).astype(np.float64)).astype(np.float32)
