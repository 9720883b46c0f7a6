"""Ask-LLM with a decoder-only instruction-tuned LLM (backend "causal").

The paper's prompt (the same text as for Flan-T5) is the user turn of the model's chat
template, with the generation prompt added; one forward pass over the whole prompt gives
the distribution of the answer's first token at the last real position. The score is
P(first token of "yes"); the summed probability of its case/space variants ("Yes",
" yes", ...) is reported beside it (`score_variants`). The chat frame is rendered at
export time and stored in the manifest, so this needs only `tokenizers`.

The graph (see `graphs.heads.causal_askllm_graph`) finds the answer position from the attention
mask, so right padding (used here) and left padding give the same scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from streamfilter.models.askllm import PROMPT_PREFIX, PROMPT_SUFFIX, AskLLMScorer, PromptTokens
from streamfilter.models.base import DEFAULT_MAX_TOKENS
from streamfilter.models.manifest import Manifest


class CausalAskLLMScorer(AskLLMScorer):
    """`AskLLMScorer` for decoder-only chat models (`backend: "causal"` folders); `load_model` picks it."""

    BACKEND = "causal"

    def __init__(self, manifest: Manifest, session, tokenizer, *, variant: str, max_tokens: int = DEFAULT_MAX_TOKENS):
        super().__init__(manifest, session, tokenizer, variant=variant, max_tokens=max_tokens)
        self.yes_variant_ids: list[int] = list(manifest.config["yes_variant_ids"])

    @property
    def chat_frame(self) -> tuple[str, str]:
        """The rendered chat template before and after the user turn (stored in the manifest at export)."""
        return self.manifest.config["chat_prefix"], self.manifest.config["chat_suffix"]

    def prompt_tokens(self) -> PromptTokens:
        # Chat frame and the paper's prompt around the document, each side tokenized as one string
        # (the pre-tokenizer splits at the newlines that bound the document, so this equals
        # tokenizing the whole rendered chat; a test checks it). No post-processor tokens: the
        # chat template writes its own special tokens, as transformers' apply_chat_template does.
        before, after = self.chat_frame
        return PromptTokens(prefix=self.tokenizer.encode(before + PROMPT_PREFIX, add_special_tokens=False).ids,
                            suffix=self.tokenizer.encode(PROMPT_SUFFIX + after, add_special_tokens=False).ids, end=[])

    def prompt_text(self, text: str) -> str:
        """The whole rendered chat for `text` (untruncated; for reading and references)."""
        before, after = self.chat_frame
        return before + PROMPT_PREFIX + text + PROMPT_SUFFIX + after

    def log_probs_all(self, texts: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [n, 2] log P(yes), log P(no); float32 [n, k] log P of each yes variant)."""
        yes_no, variants = self.run_batched(self.prompt_ids(texts), batch_size,
                                            [((2,), np.float32), ((len(self.yes_variant_ids),), np.float32)])
        return yes_no, variants

    def log_probs(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        return self.log_probs_all(texts, batch_size=batch_size)[0]

    def score_variants(self, texts: Sequence[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(P(first token of "yes"), Σ P over the yes variants), float32 [n] each."""
        yes_no, variants = self.log_probs_all(texts, batch_size=batch_size)
        return np.exp(yes_no[:, 0]).astype(np.float32), np.exp(variants.astype(np.float64)).sum(axis=1).astype(np.float32)
