"""The paper's perplexity baseline (section B.5): mean per-token NLL of a document under a causal LM.

A document is scored as the LM saw documents in pre-training: its tokens after a
document-start token (BOS, or <|endoftext|> for models without one), truncated to
`max_tokens`. The graph (`graphs.perplexity_graph`) returns only the per-document sum of
token NLLs and the number of predicted tokens; the score is their ratio (log perplexity;
perplexity = exp). Lower is "better" by this criterion; the `perplexity` policy keeps the
lowest fraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from streamfilter.errors import ConfigError
from streamfilter.models.askllm import DEFAULT_MAX_TOKENS
from streamfilter.models.manifest import Manifest, load_manifest
from streamfilter.models.text import encode_bounded, length_buckets, pad_batch


class PerplexityScorer:
    """Scores documents with their mean per-token NLL. Load with `PerplexityScorer.load(model_dir)`."""

    def __init__(self, manifest: Manifest, session, tokenizer, *, variant: str, max_tokens: int):
        if max_tokens < 2:
            raise ConfigError(f"max_tokens: perplexity needs at least 2 tokens, got {max_tokens}")
        self.manifest, self.session, self.tokenizer = manifest, session, tokenizer
        self.variant, self.max_tokens = variant, max_tokens
        self.start_token_id: int = manifest.config["document_start_token_id"]
        self.pad_token_id: int = manifest.config["pad_token_id"]
        self.model_id = f"{manifest.name}@{manifest.variant_sha256(variant)[:12]}"

    @classmethod
    def load(cls, model_dir: str | Path, *, max_tokens: int = DEFAULT_MAX_TOKENS, providers: Sequence[str] | None = None,
             intra_op_threads: int | None = None, variant: str | None = None) -> "PerplexityScorer":
        from streamfilter.models.runtime import open_model

        manifest = load_manifest(model_dir, kind="perplexity")
        session, tokenizer, variant = open_model(manifest, variant, providers=providers,
                                                 intra_op_threads=intra_op_threads)
        return cls(manifest, session, tokenizer, variant=variant, max_tokens=max_tokens)

    @property
    def provider(self) -> str:
        return self.session.provider

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """[start] + the document's first max_tokens - 1 tokens, per text."""
        return [[self.start_token_id] + d for d in encode_bounded(self.tokenizer, texts, self.max_tokens - 1)]

    def nll(self, texts: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(Σ token NLL, number of predicted tokens), float32 [n] each."""
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        sums = np.empty(len(texts), dtype=np.float32)
        counts = np.empty(len(texts), dtype=np.float32)
        if not len(texts):
            return sums, counts
        ids = self.token_ids(texts)
        for batch in length_buckets([len(s) for s in ids], batch_size):
            input_ids, mask = pad_batch([ids[i] for i in batch], self.pad_token_id)
            sums[batch], counts[batch] = self.session.run({"input_ids": input_ids, "attention_mask": mask})
        return sums, counts

    def mean_nll(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Mean per-token NLL in nats (log perplexity), float32 [n]; NaN for a text with no tokens."""
        sums, counts = self.nll(texts, batch_size=batch_size)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)

    def score(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Same as `mean_nll` (the scorer interface the daemon uses)."""
        return self.mean_nll(texts, batch_size=batch_size)

    def perplexity(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        return np.exp(self.mean_nll(texts, batch_size=batch_size).astype(np.float64)).astype(np.float32)
