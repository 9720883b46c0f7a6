"""The PyTorch/transformers reference: what a user would write without streamfilter.

Used by the export check, the parity tests and as the eager baseline in the CPU
benchmark. Not on the runtime path (imports torch).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class TorchAskLLM:
    """Flan-T5 in PyTorch eager mode: tokenize the prompt, encoder + one decoder step, log-softmax."""

    def __init__(self, model, tokenizer):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.yes_id = tokenizer("yes", add_special_tokens=False)["input_ids"][0]
        start = model.config.decoder_start_token_id
        self.start_id = start if start is not None else model.config.pad_token_id

    @classmethod
    def load(cls, model: str, *, revision: str | None = None) -> "TorchAskLLM":
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        return cls(AutoModelForSeq2SeqLM.from_pretrained(model, revision=revision, dtype="float32"),
                   AutoTokenizer.from_pretrained(model, revision=revision))

    def log_p_yes(self, prompts: Sequence[str], *, max_tokens: int = 512, batch_size: int = 16,
                  sort_by_length: bool = True) -> np.ndarray:
        """log P(yes) for full prompt strings (truncated from the right by the tokenizer, as users do)."""
        torch = self.torch
        out = np.empty(len(prompts), dtype=np.float32)
        order = np.argsort([len(p) for p in prompts], kind="stable") if sort_by_length else np.arange(len(prompts))
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                idx = order[i : i + batch_size]
                enc = self.tokenizer([prompts[j] for j in idx], padding=True, truncation=True,
                                     max_length=max_tokens, return_tensors="pt")
                out[idx] = self.log_p_yes_ids(enc["input_ids"], enc["attention_mask"])
        return out

    def log_p_yes_ids(self, input_ids, attention_mask) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            start = torch.full((input_ids.shape[0], 1), self.start_id, dtype=torch.long)
            logits = self.model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                                decoder_input_ids=start).logits[:, 0, :].float()
            return torch.log_softmax(logits, dim=-1)[:, self.yes_id].numpy()


class TorchCausalLM:
    """A decoder-only LM in PyTorch eager mode, one unpadded sequence at a time (the plainest reference)."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.model = model.eval()

    @classmethod
    def load(cls, model: str, *, revision: str | None = None) -> "TorchCausalLM":
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype="float32"))

    def answer_log_probs(self, prompts_ids: Sequence[Sequence[int]], token_ids: Sequence[int]) -> np.ndarray:
        """float32 [n, len(token_ids)]: log-softmax of the next token after each prompt, at `token_ids`."""
        torch = self.torch
        out = np.empty((len(prompts_ids), len(token_ids)), dtype=np.float32)
        with torch.inference_mode():
            for i, ids in enumerate(prompts_ids):
                logits = self.model(input_ids=torch.tensor([list(ids)])).logits[0, -1].float()
                out[i] = torch.log_softmax(logits, dim=-1)[list(token_ids)].numpy()
        return out

    def mean_nll(self, docs_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n]: transformers' loss with labels = input ids (mean NLL of tokens 2..L)."""
        torch = self.torch
        out = np.empty(len(docs_ids), dtype=np.float32)
        with torch.inference_mode():
            for i, ids in enumerate(docs_ids):
                x = torch.tensor([list(ids)])
                out[i] = float(self.model(input_ids=x, labels=x).loss)
        return out
