"""Ask-LLM (paper, section 3.1 and Figure 3): P("yes") from an instruction-tuned Flan-T5.

The document is put into the paper's prompt; one encoder pass and one decoder step from
the decoder start token give the next-token distribution, and the score is the softmax
probability of "yes" over the whole vocabulary. The exported graph (see `graphs/heads.py`)
ends in a log-softmax evaluated only at the "yes" and "no" ids, so each document
returns two floats instead of a 32k-wide logit row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from streamfilter.errors import ConfigError, UserError
from streamfilter.models.base import DEFAULT_MAX_TOKENS, OnnxTextModel
from streamfilter.models.manifest import Manifest
from streamfilter.models.text import encode_bounded, special_wrap

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


class AskLLMScorer(OnnxTextModel):
    """Scores documents with P("yes" | Ask-LLM prompt) from a seq2seq (Flan-T5) folder.

    Load with `AskLLMScorer.load(model_dir, max_tokens=..., variant=...)`, or with
    `load_model(model_dir)`, which picks `CausalAskLLMScorer` for `backend: "causal"` folders.
    """

    KIND = "askllm"
    BACKEND = "seq2seq"

    def __init__(self, manifest: Manifest, session, tokenizer, *, variant: str, max_tokens: int = DEFAULT_MAX_TOKENS):
        super().__init__(manifest, session, tokenizer, variant=variant, max_tokens=max_tokens)
        self.yes_token_id: int = manifest.config["yes_token_id"]
        self.no_token_id: int = manifest.config["no_token_id"]
        self.prompt = self.prompt_tokens()
        self.document_budget = self.prompt.document_budget(max_tokens)
        if self.document_budget < 1:
            raise ConfigError(
                f"max_tokens: {max_tokens} leaves no room for the document (the prompt alone takes "
                f"{max_tokens - self.document_budget} tokens)"
            )

    @classmethod
    def check_manifest(cls, manifest: Manifest) -> None:
        super().check_manifest(manifest)
        if manifest.config.get("prompt_version") != PROMPT_VERSION:
            raise UserError(f"{manifest.root}: exported for prompt {manifest.config.get('prompt_version')!r}, "
                            f"this version scores with {PROMPT_VERSION!r}; re-export the model")

    def prompt_tokens(self) -> PromptTokens:
        """The prompt's fixed tokens: the tokenizer's own special tokens around the paper's prompt."""
        lead, end = special_wrap(self.tokenizer)
        prefix = self.tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False).ids
        suffix = self.tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False).ids
        return PromptTokens(prefix=lead + prefix, suffix=suffix, end=end)

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
        (logp,) = self.run_batched(self.prompt_ids(texts), batch_size, [((2,), np.float32)])
        return logp
