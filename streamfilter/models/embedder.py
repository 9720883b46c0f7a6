"""Sentence embeddings (paper, appendix B.2: Sentence-T5-Base, 768-d) for the density sketch.

The exported graph (see `graphs.py`) is the sentence-transformers pipeline read from the
model's module list: encoder → pooling (mean/CLS/max, masked) → Dense when present
(sentence-t5's bias-free 768→768 `2_Dense`, which exporters drop silently) → L2
normalisation. It returns [batch, dim] float32; fp16 output is a cast on the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from streamfilter.errors import ConfigError
from streamfilter.models.manifest import Manifest, load_manifest
from streamfilter.models.text import encode_bounded, length_buckets, pad_batch, special_wrap

DTYPES = {"float32": np.float32, "float16": np.float16}


class SentenceEmbedder:
    """Embeds documents as L2-normalised vectors. Load with `SentenceEmbedder.load(model_dir)`."""

    def __init__(self, manifest: Manifest, session, tokenizer, *, variant: str, dtype: str, max_tokens: int):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.variant = variant
        self.dtype = np.dtype(DTYPES[dtype])
        self.max_tokens = max_tokens
        cfg = manifest.config
        self.dim: int = cfg["dim"]
        self.pad_token_id: int = cfg["pad_token_id"]
        self.do_lower_case: bool = cfg.get("do_lower_case", False)
        self.lead, self.end = special_wrap(tokenizer)
        self.document_budget = max_tokens - len(self.lead) - len(self.end)
        if self.document_budget < 1:
            raise ConfigError(f"max_tokens: {max_tokens} leaves no room for text")
        self.model_id = f"{manifest.name}@{manifest.variant_sha256(variant)[:12]}"

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        variant: str | None = None,
        max_tokens: int | None = None,
    ) -> "SentenceEmbedder":
        """Load an exported embedder folder, checking every file against its manifest.

        `max_tokens=None` uses the model's own `max_seq_length` (sentence-t5-base: 256).
        """
        from streamfilter.models.runtime import open_model

        manifest = load_manifest(model_dir, kind="embedder")
        session, tokenizer, variant = open_model(manifest, variant, providers=providers,
                                                 intra_op_threads=intra_op_threads)
        return cls(manifest, session, tokenizer, variant=variant, dtype=dtype,
                   max_tokens=max_tokens or manifest.config["max_seq_length"])

    @property
    def provider(self) -> str:
        return self.session.provider

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as sentence-transformers would feed them: stripped, lower-cased if the model is, truncated."""
        prepared = [t.strip() for t in texts]
        if self.do_lower_case:
            prepared = [t.lower() for t in prepared]
        return [self.lead + ids + self.end for ids in encode_bounded(self.tokenizer, prepared, self.document_budget)]

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """[len(texts), dim] L2-normalised embeddings in `dtype`; input order kept."""
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        out = np.empty((len(texts), self.dim), dtype=self.dtype)
        if not len(texts):
            return out
        ids = self.token_ids(texts)
        for batch in length_buckets([len(s) for s in ids], batch_size):
            input_ids, mask = pad_batch([ids[i] for i in batch], self.pad_token_id)
            (emb,) = self.session.run({"input_ids": input_ids, "attention_mask": mask})
            out[batch] = emb
        return out
