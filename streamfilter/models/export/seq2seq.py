"""Export a (Flan-)T5 model as an Ask-LLM folder (backend "seq2seq"), through optimum's ONNX exporter.

optimum's `text2text-generation` export (encoder and decoder graphs, no KV cache) is joined
into one graph (`graphs.heads.askllm_graph`: one encoder pass, one decoder step from the start
token, log-softmax at "yes" and "no"), with int8 and fp16 variants. The fp32 graph is checked
against transformers before the folder is published.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from streamfilter.errors import UserError
from streamfilter.models.askllm import PROMPT_VERSION, make_prompt
from streamfilter.models.export.common import (TOKENIZER_FILE, VALIDATION_TEXTS, created_at, display_name,
                                               manifest_variants, optimum_export, publish, save_tokenizer,
                                               source_fields, staging_dir, variant_notes, versions)

log = logging.getLogger(__name__)

ASKLLM_VARIANTS = ("fp32", "int8", "fp16")


def export_seq2seq_askllm(
    model: str,
    out: str | Path,
    *,
    config,
    revision: str | None,
    name: str | None,
    variants: Sequence[str],
    max_tokens: int,
    opset: int | None,
    validate: bool,
) -> Path:
    """Export an encoder-decoder model (its transformers `config` already read, the extra and the
    `variants` checked, the defaults set: see `export_askllm`): model.onnx (fp32) plus the other `variants`."""
    import onnx
    from transformers import AutoTokenizer

    from streamfilter.models.graphs import edit, heads, quantize

    out = Path(out)
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    yes_id, no_id = _single_token(tokenizer, "yes"), _single_token(tokenizer, "no")
    start_id = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id

    with tempfile.TemporaryDirectory(prefix="streamfilter-export-") as tmp:
        optimum_export(model, tmp, task="text2text-generation", revision=revision, opset=opset,
                       library_name="transformers", no_post_process=True)
        encoder = onnx.load(str(Path(tmp) / "encoder_model.onnx"))
        decoder = onnx.load(str(Path(tmp) / "decoder_model.onnx"))
        merged = heads.askllm_graph(encoder, decoder, decoder_start_token_id=start_id,
                                    yes_token_id=yes_id, no_token_id=no_id)
        del encoder, decoder
    saved = edit.dedupe_initializers(merged)
    log.info("askllm graph: one encoder pass + one decoder step; %.1f MB of duplicate weights shared", saved / 1e6)

    staging = staging_dir(out)
    files = {"fp32": edit.save_model(merged, staging / "model.onnx")}
    if "int8" in variants:
        files["int8"] = quantize.quantize_int8(staging / "model.onnx", staging / "model.int8.onnx",
                                               exclude_nodes=quantize.lm_head_nodes(merged, config.vocab_size))
    if "fp16" in variants:
        half, n = quantize.mixed_precision(merged, "float16")
        files["fp16"] = edit.save_model(half, staging / "model.fp16.onnx")
        log.info("fp16 variant: %d matmuls in fp16; feed-forward output, norms, residuals in fp32", n)
    opset_version = edit.opset_version(merged)
    del merged
    save_tokenizer(tokenizer.backend_tokenizer, staging / TOKENIZER_FILE)

    fields = {
        "kind": "askllm",
        "backend": "seq2seq",
        "name": name or display_name(model),
        "source": source_fields(model, revision, "transformers", getattr(config, "_commit_hash", None)),
        "variants": manifest_variants(files, variant_notes),
        "tokenizer": TOKENIZER_FILE,
        "config": {
            "prompt_version": PROMPT_VERSION,
            "yes_token_id": yes_id,
            "no_token_id": no_id,
            "decoder_start_token_id": start_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            "vocab_size": config.vocab_size,
            "max_tokens": max_tokens,
            "model_type": config.model_type,
            "d_model": getattr(config, "d_model", None),
            "output": {"name": heads.ASKLLM_OUTPUT, "shape": ["batch", 2], "meaning": "log P(yes), log P(no) over the full vocabulary"},
        },
        "dtype": "float32",
        "opset": opset_version,
        "exporter": versions(),
        "created_at": created_at(),
    }
    publish(staging, out, fields, files,
            (lambda: _validate(model, revision, staging, max_tokens)) if validate else None)
    log.info("exported askllm %s to %s in %.1f s", model, out, time.monotonic() - t0)
    return out


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"tokenizer: {word!r} is {len(ids)} tokens ({ids}); Ask-LLM needs it to be one token")
    return int(ids[0])


def _validate(model: str, revision: str | None, folder: Path, max_tokens: int) -> None:
    """P(yes) of the fp32 graph against transformers' on the validation texts, to 1e-4."""
    from streamfilter.models.askllm import AskLLMScorer
    from streamfilter.models.reference import TorchAskLLM

    scorer = AskLLMScorer.load(folder, variant="fp32", max_tokens=max_tokens)
    ref = TorchAskLLM.load(model, revision=revision)
    ours = scorer.log_probs(list(VALIDATION_TEXTS), batch_size=4)[:, 0]
    theirs = ref.log_p_yes([make_prompt(t) for t in VALIDATION_TEXTS], max_tokens=max_tokens)
    err = float(np.max(np.abs(np.exp(ours) - np.exp(theirs))))
    if err > 1e-4:
        raise UserError(f"export check failed: ONNX P(yes) differs from PyTorch by {err:.2e} (> 1e-4)")
    log.info("export check: max |ΔP(yes)| vs PyTorch = %.1e", err)
