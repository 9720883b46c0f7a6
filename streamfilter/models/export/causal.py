"""Export a decoder-only (causal) LM for Ask-LLM and for the perplexity baseline (backend "causal").

    export_causal("Qwen/Qwen2.5-1.5B-Instruct", askllm_out="onnx_models/qwen-askllm",
                  perplexity_out="onnx_models/qwen-perplexity")

One optimum `text-generation` export (no KV cache: one forward pass per document), then
two graph heads on it (`graphs.heads.causal_askllm_graph`, `graphs.heads.perplexity_graph`), each in
its own model folder with a manifest (`backend: "causal"`). The chat template is rendered
here, once, with transformers, and stored as the text before and after the user turn
(`chat_prefix`, `chat_suffix` in the manifest), so the runtime needs only `tokenizers`.

Weights over 2 GB stay in optimum's side file (`model.onnx_data`), copied into each
folder; graphs are edited without loading it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from streamfilter.errors import UserError
from streamfilter.models.askllm import PROMPT_VERSION
from streamfilter.models.base import DEFAULT_MAX_TOKENS
from streamfilter.models.export.common import (TOKENIZER_FILE, VALIDATION_TEXTS, check_variants, created_at,
                                               display_name, manifest_variants, optimum_export, publish,
                                               require_export_extra, save_tokenizer, source_fields, staging_dir,
                                               variant_notes, versions)
from streamfilter.models.manifest import load_manifest, write_manifest

log = logging.getLogger(__name__)

CAUSAL_VARIANTS = ("fp32", "int8")
# The answer's first token: "yes" as the model may start it. The first is the score; the
# summed probability of all of them (deduplicated first tokens) is reported beside it.
YES_VARIANTS = ("yes", "Yes", " yes", " Yes", "YES")
USER_SENTINEL = "\u2063STREAMFILTER_DOCUMENT\u2063"


def is_causal_lm(config) -> bool:
    """Whether a transformers config is a decoder-only LM (one `AutoModelForCausalLM` loads)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def chat_frame(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a user turn, with the generation prompt added."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; Ask-LLM with a causal LM needs an instruction-tuned "
                        "model whose tokenizer defines one")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": USER_SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(USER_SENTINEL) != 1:
        raise UserError("the chat template does not put the user message into the prompt exactly once")
    before, after = rendered.split(USER_SENTINEL)
    return before, after


def first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"tokenizer: {text!r} encodes to no tokens")
    return int(ids[0])


def document_start_id(tokenizer) -> int:
    """The token a document follows in pre-training: BOS, else <|endoftext|>, else EOS."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot is not None:
        return int(eot)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise UserError("tokenizer: no BOS, <|endoftext|> or EOS token to start a document with")


def _uses_external_data(model) -> bool:
    from onnx import TensorProto

    return any(i.data_location == TensorProto.EXTERNAL for i in model.graph.initializer)


def _save_graph(graph, base_dir: Path, external: list[str], staging: Path, file_name: str = "model.onnx") -> list[str]:
    """Save `graph`; weights that live in optimum's side files are copied beside it."""
    import onnx

    from streamfilter.models.graphs import edit

    if not external:
        return edit.save_model(graph, staging / file_name)
    onnx.save_model(graph, str(staging / file_name))
    for name in external:
        # A copy, not a hard link: onnx refuses external data files with several links.
        shutil.copyfile(base_dir / name, staging / name)
    return [file_name, *external]


def export_causal(
    model: str,
    *,
    askllm_out: str | Path | None = None,
    perplexity_out: str | Path | None = None,
    revision: str | None = None,
    name: str | None = None,
    variants: Sequence[str] = CAUSAL_VARIANTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    opset: int | None = None,
    validate: bool = True,
) -> dict[str, Path]:
    """Export a causal LM as an Ask-LLM folder and/or a perplexity folder. Returns {kind: folder}.

    `model`: a hub id or a local `save_pretrained`-style folder whose tokenizer has a chat
    template (needed for Ask-LLM only).
    """
    require_export_extra()
    import onnx
    from transformers import AutoConfig, AutoTokenizer

    from streamfilter.models.graphs import edit, heads

    if askllm_out is None and perplexity_out is None:
        raise UserError("export_causal: give askllm_out and/or perplexity_out")
    check_variants(variants, CAUSAL_VARIANTS)
    t0 = time.monotonic()
    config = AutoConfig.from_pretrained(model, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("tokenizer: no pad or EOS token to pad batches with")
    common = {
        "name": name or display_name(model),
        "backend": "causal",
        "source": source_fields(model, revision, "transformers", getattr(config, "_commit_hash", None)),
        "tokenizer": TOKENIZER_FILE,
        "dtype": "float32",
        "exporter": versions(),
    }
    base_config = {"pad_token_id": int(pad_id), "vocab_size": int(config.vocab_size), "max_tokens": max_tokens,
                   "model_type": config.model_type, "padding_side": "right"}
    outs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="streamfilter-export-") as tmp:
        tmp_path = Path(tmp)
        optimum_export(model, tmp, task="text-generation", revision=revision, opset=opset,
                       library_name="transformers", no_post_process=True)
        base = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
        external = sorted({e.value for i in base.graph.initializer for e in i.external_data if e.key == "location"})
        big = _uses_external_data(base)
        opset_version = edit.opset_version(base)
        jobs = []
        if askllm_out is not None:
            prefix_text, suffix_text = chat_frame(tokenizer)
            yes_ids = list(dict.fromkeys(first_token(tokenizer, v) for v in YES_VARIANTS))
            yes_id, no_id = first_token(tokenizer, "yes"), first_token(tokenizer, "no")
            graph = heads.causal_askllm_graph(base, yes_token_id=yes_id, no_token_id=no_id, yes_variant_ids=yes_ids,
                                              check=not big)
            cfg = {"prompt_version": PROMPT_VERSION, "chat_prefix": prefix_text, "chat_suffix": suffix_text,
                   "yes_token_id": yes_id, "no_token_id": no_id, "yes_variant_ids": yes_ids,
                   "yes_variants": [tokenizer.convert_ids_to_tokens(i) for i in yes_ids], **base_config,
                   "output": {"name": heads.ASKLLM_OUTPUT, "shape": ["batch", 2],
                              "meaning": "log P(yes first token), log P(no first token) at the answer position, "
                                         "over the full vocabulary"},
                   "variants_output": {"name": heads.CAUSAL_ASKLLM_VARIANTS_OUTPUT, "shape": ["batch", len(yes_ids)],
                                       "meaning": "log P of each yes_variant_ids token at the answer position"}}
            jobs.append(("askllm", Path(askllm_out), graph, cfg))
        if perplexity_out is not None:
            graph = heads.perplexity_graph(base, check=not big)
            cfg = {"document_start_token_id": document_start_id(tokenizer), **base_config,
                   "outputs": {"nll_sum": "sum over predicted tokens of -log P(token | previous)",
                               "n_predicted": "number of predicted tokens"}}
            jobs.append(("perplexity", Path(perplexity_out), graph, cfg))
        del base
        for kind, out, graph, cfg in jobs:
            staging = staging_dir(out)
            files = {"fp32": _save_graph(graph, tmp_path, external, staging)}
            if "int8" in variants:
                files["int8"] = quantize_causal_int8(staging / "model.onnx", graph, config.vocab_size)
            del graph
            save_tokenizer(tokenizer.backend_tokenizer, staging / TOKENIZER_FILE)
            fields = {"kind": kind, **common,
                      "variants": manifest_variants(files, lambda v: causal_variant_notes(v, kind)),
                      "config": cfg, "opset": opset_version,
                      "created_at": created_at()}
            publish(staging, out, fields, files,
                    (lambda: _validate(kind, model, revision, staging, max_tokens)) if validate else None)
            outs[kind] = out
            log.info("exported %s (causal) %s to %s", kind, model, out)
    log.info("causal export of %s done in %.1f s", model, time.monotonic() - t0)
    return outs


def _validate(kind: str, model: str, revision: str | None, folder: Path, max_tokens: int) -> None:
    from streamfilter.models.reference import TorchCausalLM

    ref = TorchCausalLM.load(model, revision=revision)
    texts = list(VALIDATION_TEXTS)
    if kind == "askllm":
        from streamfilter.models.askllm_causal import CausalAskLLMScorer

        scorer = CausalAskLLMScorer.load(folder, variant="fp32", max_tokens=max_tokens)
        ids = scorer.prompt_ids(texts)
        ours = scorer.log_probs(texts, batch_size=4)[:, 0]
        theirs = ref.answer_log_probs(ids, [scorer.yes_token_id])[:, 0]
        err = float(np.max(np.abs(np.exp(ours) - np.exp(theirs))))
        what = "P(yes)"
    else:
        from streamfilter.models.perplexity import PerplexityScorer

        scorer = PerplexityScorer.load(folder, variant="fp32", max_tokens=max_tokens)
        ours = scorer.mean_nll(texts, batch_size=4)
        theirs = ref.mean_nll(scorer.token_ids(texts))
        err = float(np.max(np.abs(ours - theirs)))
        what = "mean NLL"
    if not err <= 1e-4 * (1 if kind == "askllm" else max(1.0, float(np.max(np.abs(theirs))))):
        raise UserError(f"export check failed: ONNX {what} differs from PyTorch by {err:.2e} (> 1e-4)")
    log.info("export check (%s): max |Δ%s| vs PyTorch = %.1e", kind, what, err)


# Where LLM activations have outliers, per-tensor int8 activations lose them: the down
# projections stay fp32 (on Qwen2.5-1.5B, quantizing them too moved P(yes) by up to 0.5;
# bench/RESULTS.md, "Real-model Ask-LLM check").
CAUSAL_INT8_NOTE = ("dynamic int8 (weights per column, activations per batch) for attention and feed-forward input "
                    "matmuls; feed-forward down projections, embeddings and LM head fp32")


def causal_variant_notes(variant: str, kind: str) -> dict:
    """Manifest notes of a causal variant; Ask-LLM's int8 is never picked by `variant = auto`: it
    lowered real-vs-junk ROC AUC from 0.963 to 0.916 on Qwen2.5-1.5B (perplexity's: -0.006)."""
    if variant != "int8":
        return variant_notes(variant)
    return {"device": "cpu", "note": CAUSAL_INT8_NOTE, **({"auto": False} if kind == "askllm" else {})}


def quantize_causal_int8(src: Path, graph, vocab_size: int) -> list[str]:
    """The causal int8 variant of `src` (its `graph` already loaded, weights not needed), written
    beside it as `model.int8.onnx` one weight at a time, whatever the model's size."""
    from streamfilter.models.graphs import quantize

    keep = quantize.lm_head_nodes(graph, vocab_size) + quantize.down_projection_nodes(graph, vocab_size)
    return quantize.quantize_int8_streaming(src, src.with_name("model.int8.onnx"), exclude_nodes=keep)


def add_int8_variant(folder: str | Path, *, replace: bool = False) -> Path:
    """Add the int8 variant to an exported causal folder that holds fp32 only (one exported with
    `variants=("fp32",)`), without exporting again, or (`replace`) make it anew with the current
    recipe; the manifest is rewritten with the new files."""
    import onnx

    m = load_manifest(folder)
    if m.backend != "causal":
        raise UserError(f"{m.root}: add_int8_variant is for causal exports; this one is {m.backend!r}")
    if "int8" in m.variants and not replace:
        return m.root
    old = set(m.files) - {f for v, spec in m.variants.items() if v != "int8"
                          for f in [spec["model"], *spec.get("external_data", [])]} - {m.tokenizer}
    for name in old:
        m.path(name).unlink(missing_ok=True)
    src = m.path(m.variants["fp32"]["model"])
    files = quantize_causal_int8(src, onnx.load(str(src), load_external_data=False), m.config["vocab_size"])
    fields = {k: v for k, v in m.raw.items() if k not in ("format_version", "files")}
    fields["variants"] = {**m.variants, "int8": {"model": files[0], "external_data": files[1:],
                                                 **causal_variant_notes("int8", m.kind)}}
    write_manifest(m.root, fields, sorted((set(m.files) - old) | set(files)))
    log.info("added int8 to %s (%s)", m.root, ", ".join(files))
    return m.root
