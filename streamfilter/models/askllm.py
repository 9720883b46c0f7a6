"""Ask-LLM (paper, section 3.1 and Figure 3): P("yes") from an instruction-tuned Flan-T5.

The document is put into the paper's prompt; one encoder pass and one decoder step from
the decoder start token give the next-token distribution, and the score is the softmax
probability of "yes" over the whole vocabulary. The exported graph (see `graphs.py`)
ends in a log-softmax evaluated only at the "yes" and "no" ids, so each document
returns two floats instead of a 32k-wide logit row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from streamfilter.errors import ConfigError, UserError
from streamfilter.models.manifest import Manifest, load_manifest
from streamfilter.models.text import encode_bounded, length_buckets, pad_batch

# The paper's Figure 3 prompt, split around the document. Fixed in DESIGN.md; a change
# gets a new version so that scores of different prompts are never mixed.
PROMPT_VERSION = "askllm-figure3-v1"
PROMPT_PREFIX = "###\n"
PROMPT_SUFFIX = (
    "\n###\n\n"
    "Does the previous paragraph demarcated within ### and ### contain informative signal for pre-training "
    "a large-language model? An informative datapoint should be well-formatted, contain some usable knowledge "
    "of the world, and strictly NOT have any harmful, racist, sexist, etc. content.\n\n"
    "OPTIONS:\n- yes\n- no"
)
DEFAULT_MAX_TOKENS = 512


def make_prompt(text: str) -> str:
    """The full prompt for `text` (for references and for reading; scoring tokenizes it in pieces)."""
    return PROMPT_PREFIX + text + PROMPT_SUFFIX


@dataclass(frozen=True)
class PromptTokens:
    """The fixed token ids around the document: prefix, suffix (question and OPTIONS) and end tokens."""

    prefix: list[int]
    suffix: list[int]
    end: list[int]  # the tokenizer's post-processor tokens (T5: </s>)

    def document_budget(self, max_tokens: int) -> int:
        return max_tokens - len(self.prefix) - len(self.suffix) - len(self.end)

    def wrap(self, doc_ids: list[int]) -> list[int]:
        return self.prefix + doc_ids + self.suffix + self.end


class AskLLMScorer:
    """Scores documents with P("yes" | Ask-LLM prompt). Load with `AskLLMScorer.load(model_dir)`.

    `load` returns a `CausalAskLLMScorer` (same interface) when the folder's manifest says
    `backend: "causal"` (a decoder-only instruction-tuned LLM).
    """

    def __init__(self, manifest: Manifest, session, tokenizer, *, variant: str, max_tokens: int):
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.variant = variant
        self.max_tokens = max_tokens
        cfg = manifest.config
        self.yes_token_id: int = cfg["yes_token_id"]
        self.no_token_id: int = cfg["no_token_id"]
        self.pad_token_id: int = cfg["pad_token_id"]
        self.prompt = self._prompt_tokens(tokenizer)
        self.document_budget = self.prompt.document_budget(max_tokens)
        if self.document_budget < 1:
            raise ConfigError(
                f"max_tokens: {max_tokens} leaves no room for the document (the prompt alone takes "
                f"{max_tokens - self.document_budget} tokens)"
            )
        self.model_id = f"{manifest.name}@{manifest.variant_sha256(variant)[:12]}"

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        variant: str | None = None,
    ) -> "AskLLMScorer":
        """Load an exported Ask-LLM model folder, checking every file against its manifest.

        `variant`: "fp32", "int8" (CPU), "fp16" (GPU: fp16 matmuls, fp32 feed-forward
        output and residual stream), or None for the best the device supports.
        """
        from streamfilter.models.runtime import open_model

        manifest = load_manifest(model_dir, kind="askllm")
        if manifest.backend == "causal" and cls is AskLLMScorer:
            from streamfilter.models.askllm_causal import CausalAskLLMScorer

            cls = CausalAskLLMScorer
        if manifest.config.get("prompt_version") != PROMPT_VERSION:
            raise UserError(f"{model_dir}: exported for prompt {manifest.config.get('prompt_version')!r}, "
                            f"this version scores with {PROMPT_VERSION!r}; re-export the model")
        session, tokenizer, variant = open_model(manifest, variant, providers=providers,
                                                 intra_op_threads=intra_op_threads)
        return cls(manifest, session, tokenizer, variant=variant, max_tokens=max_tokens)

    @staticmethod
    def _prompt_tokens(tokenizer) -> PromptTokens:
        return _prompt_tokens(tokenizer)

    @property
    def backend(self) -> str:
        """"seq2seq" (Flan-T5: encoder + one decoder step) or "causal" (decoder-only, chat template)."""
        return self.manifest.backend

    @property
    def provider(self) -> str:
        return self.session.provider

    def prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each document's prompt: the document truncated to fit, the question never."""
        docs = encode_bounded(self.tokenizer, texts, self.document_budget)
        return [self.prompt.wrap(d) for d in docs]

    def score_with_log(self, texts: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(P(yes), log P(yes)) as float32 arrays of shape [len(texts)]; input order kept."""
        logp = self.log_probs(texts, batch_size=batch_size)[:, 0]
        return np.exp(logp).astype(np.float32), logp

    def score(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """P("yes") in [0, 1], float32 [len(texts)]: softmax over the whole vocabulary."""
        return self.score_with_log(texts, batch_size=batch_size)[0]

    def log_score(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """log P("yes"), float32 [len(texts)] (finer resolution than P near 0)."""
        return self.score_with_log(texts, batch_size=batch_size)[1]

    def log_probs(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """float32 [len(texts), 2]: log P("yes"), log P("no") over the whole vocabulary."""
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        out = np.empty((len(texts), 2), dtype=np.float32)
        if not len(texts):
            return out
        ids = self.prompt_ids(texts)
        for batch in length_buckets([len(s) for s in ids], batch_size):
            input_ids, mask = pad_batch([ids[i] for i in batch], self.pad_token_id)
            (logp,) = self.session.run({"input_ids": input_ids, "attention_mask": mask})
            out[batch] = logp
        return out


def _prompt_tokens(tokenizer) -> PromptTokens:
    from streamfilter.models.text import special_wrap

    lead, end = special_wrap(tokenizer)
    prefix = tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False).ids
    suffix = tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False).ids
    return PromptTokens(prefix=lead + prefix, suffix=suffix, end=end)

