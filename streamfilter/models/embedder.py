"""Sentence embeddings (paper, appendix B.2: Sentence-T5-Base, 768-d) for the density sketch.

The exported graph (see `graphs/heads.py`) is the sentence-transformers pipeline read from the
model's module list: encoder → pooling (mean/CLS/max, masked) → Dense when present
(sentence-t5's bias-free 768→768 `2_Dense`, which exporters drop silently) → L2
normalisation. It returns [batch, dim] float32; fp16 output is a cast on the host.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from streamfilter.errors import ConfigError
from streamfilter.models.base import OnnxTextModel
from streamfilter.models.manifest import Manifest
from streamfilter.models.text import encode_bounded, special_wrap

DTYPES = {"float32": np.float32, "float16": np.float16}


class SentenceEmbedder(OnnxTextModel):
    """Embeds documents as L2-normalised vectors. Load with `SentenceEmbedder.load(model_dir)`.

    `dtype`: "float32" or "float16" (a cast on the host); `max_tokens=None` uses the model's own
    `max_seq_length` (sentence-t5-base: 256).
    """

    KIND = "embedder"

    def __init__(self, manifest: Manifest, session, tokenizer, *, variant: str, dtype: str = "float32",
                 max_tokens: int | None = None):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        super().__init__(manifest, session, tokenizer, variant=variant,
                         max_tokens=max_tokens or manifest.config["max_seq_length"])
        self.dtype = np.dtype(DTYPES[dtype])
        self.dim: int = manifest.config["dim"]
        self.do_lower_case: bool = manifest.config.get("do_lower_case", False)
        self.lead, self.end = special_wrap(tokenizer)
        self.document_budget = self.max_tokens - len(self.lead) - len(self.end)
        if self.document_budget < 1:
            raise ConfigError(f"max_tokens: {self.max_tokens} leaves no room for text")

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as sentence-transformers would feed them: stripped, lower-cased if the model is, truncated."""
        prepared = [t.strip() for t in texts]
        if self.do_lower_case:
            prepared = [t.lower() for t in prepared]
        return [self.lead + ids + self.end for ids in encode_bounded(self.tokenizer, prepared, self.document_budget)]

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """[len(texts), dim] L2-normalised embeddings in `dtype`; input order kept."""
        (out,) = self.run_batched(self.token_ids(texts), batch_size, [((self.dim,), self.dtype)])
        return out
