"""Export Hugging Face models to streamfilter model folders, through optimum's ONNX exporter.

    export_askllm("google/flan-t5-small", "onnx_models/flan-t5-small")
    export_embedder("sentence-transformers/sentence-t5-base", "onnx_models/sentence-t5-base")
    export_causal("Qwen/Qwen2.5-1.5B-Instruct", askllm_out="onnx_models/qwen-askllm",
                  perplexity_out="onnx_models/qwen-perplexity")

One module per model family: `seq2seq` (Flan-T5 Ask-LLM), `causal` (decoder-only LMs: Ask-LLM
and the perplexity baseline), `embedder` (sentence-transformers); `common` holds what they
share. Any Flan-T5 size, decoder-only chat model and sentence-transformers model goes through
the same code; a local folder (`save_pretrained` / `SentenceTransformer.save`) works like a
hub id, which is how the offline test models are built (`testmodels.py`). Each export is
checked against the PyTorch reference before its manifest is written, so a folder with a
manifest is a folder whose fp32 graph matched the reference.

Needs the `export` extra (torch, transformers, optimum-onnx, sentence-transformers, onnx);
importing this package does not: each export imports them when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from streamfilter.errors import UserError
from streamfilter.models.base import DEFAULT_MAX_TOKENS
from streamfilter.models.export.causal import (CAUSAL_VARIANTS, YES_VARIANTS, add_int8_variant, chat_frame,
                                               export_causal, is_causal_lm)
from streamfilter.models.export.common import check_variants, require_export_extra
from streamfilter.models.export.embedder import EMBEDDER_VARIANTS, export_embedder
from streamfilter.models.export.seq2seq import ASKLLM_VARIANTS, export_seq2seq_askllm

__all__ = ["export_askllm", "export_embedder", "export_causal", "add_int8_variant", "chat_frame", "check_variants",
           "ASKLLM_VARIANTS", "CAUSAL_VARIANTS", "EMBEDDER_VARIANTS", "YES_VARIANTS"]


def export_askllm(
    model: str,
    out: str | Path,
    *,
    revision: str | None = None,
    name: str | None = None,
    variants: Sequence[str] = ASKLLM_VARIANTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    opset: int | None = None,
    validate: bool = True,
) -> Path:
    """Export an Ask-LLM folder: model.onnx (fp32) plus the other `variants`.

    The model's config says which family: an encoder-decoder (Flan-T5) goes to
    `seq2seq.export_seq2seq_askllm`, a decoder-only causal LM to `causal.export_causal`
    (which has no fp16 variant: it is dropped from `variants`).
    """
    require_export_extra()
    from transformers import AutoConfig

    check_variants(variants, ASKLLM_VARIANTS)
    config = AutoConfig.from_pretrained(model, revision=revision)
    options = dict(revision=revision, name=name, max_tokens=max_tokens, opset=opset, validate=validate)
    if getattr(config, "is_encoder_decoder", False):
        return export_seq2seq_askllm(model, out, config=config, variants=variants, **options)
    if is_causal_lm(config):
        return export_causal(model, askllm_out=Path(out), variants=[v for v in variants if v != "fp16"],
                             **options)["askllm"]
    raise UserError(f"{model}: Ask-LLM export expects an encoder-decoder (T5-family) or a decoder-only "
                    f"causal LM, got {config.model_type!r}")
