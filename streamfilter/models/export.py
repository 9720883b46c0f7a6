"""Export Hugging Face models to streamfilter model folders, through optimum's ONNX exporter.

    export_askllm("google/flan-t5-small", "onnx_models/flan-t5-small")
    export_embedder("sentence-transformers/sentence-t5-base", "onnx_models/sentence-t5-base")

Any Flan-T5 size and any sentence-transformers model go through the same code; a local
folder (`save_pretrained` / `SentenceTransformer.save`) works like a hub id, which is how
the offline test models are built (`testmodels.py`). Each export is checked against the
PyTorch reference before its manifest is written, so a folder with a manifest is a
folder whose fp32 graph matched the reference.

Needs the `export` extra (torch, transformers, optimum-onnx, sentence-transformers, onnx).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from streamfilter.errors import UserError
from streamfilter.models.askllm import DEFAULT_MAX_TOKENS, PROMPT_VERSION, make_prompt
from streamfilter.models.manifest import write_manifest

log = logging.getLogger(__name__)

ASKLLM_VARIANTS = ("fp32", "int8", "fp16")
EMBEDDER_VARIANTS = ("fp32", "int8")
VALIDATION_TEXTS = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "buy cheap buy cheap buy cheap click here click here",
    "Photosynthesis converts light energy into chemical energy that can later be released to fuel the "
    "organism's activities. " * 6,
    "?",
)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("optimum", "optimum-onnx", "transformers", "torch", "sentence-transformers", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _source(model: str, revision: str | None, library: str, commit: str | None) -> dict:
    local = Path(model).exists()
    return {"model": str(Path(model).resolve()) if local else model, "revision": revision or ("local" if local else "main"),
            "commit": commit, "library": library}


def check_variants(variants: Sequence[str], allowed: Sequence[str]) -> None:
    """Every export writes fp32 (the reference the others are checked against) and only known variants."""
    if "fp32" not in variants or set(variants) - set(allowed):
        raise UserError(f"variants: must include fp32 and be among {', '.join(allowed)} (got {', '.join(variants)})")


def _require_export_extra() -> None:
    try:
        import optimum.exporters.onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise UserError(f"exporting needs the `export` extra (pip install 'streamfilter[export]'): {exc}") from None


def _save_tokenizer(backend, path: Path) -> None:
    """Write a `tokenizers` JSON with padding and truncation off (the runtime pads and truncates itself)."""
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(path))


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
    """Export a (Flan-)T5 model as an Ask-LLM folder: model.onnx (fp32) plus the other `variants`."""
    _require_export_extra()
    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig, AutoTokenizer
    import onnx

    from streamfilter.models import graphs

    check_variants(variants, ASKLLM_VARIANTS)
    out = Path(out)
    t0 = time.monotonic()
    config = AutoConfig.from_pretrained(model, revision=revision)
    if not getattr(config, "is_encoder_decoder", False):
        if _is_causal_lm(config):
            from streamfilter.models.export_causal import export_causal

            return export_causal(model, askllm_out=out, revision=revision, name=name,
                                 variants=[v for v in variants if v != "fp16"], max_tokens=max_tokens, opset=opset,
                                 validate=validate)["askllm"]
        raise UserError(f"{model}: Ask-LLM export expects an encoder-decoder (T5-family) or a decoder-only "
                        f"causal LM, got {config.model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    yes_id, no_id = _single_token(tokenizer, "yes"), _single_token(tokenizer, "no")
    start_id = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id

    with tempfile.TemporaryDirectory(prefix="streamfilter-export-") as tmp:
        main_export(model, tmp, task="text2text-generation", revision=revision or "main", opset=opset,
                    library_name="transformers", do_validation=False, no_post_process=True)
        encoder = onnx.load(str(Path(tmp) / "encoder_model.onnx"))
        decoder = onnx.load(str(Path(tmp) / "decoder_model.onnx"))
        merged = graphs.askllm_graph(encoder, decoder, decoder_start_token_id=start_id,
                                     yes_token_id=yes_id, no_token_id=no_id)
        del encoder, decoder
    saved = graphs.dedupe_initializers(merged)
    log.info("askllm graph: one encoder pass + one decoder step; %.1f MB of duplicate weights shared", saved / 1e6)

    staging = _staging_dir(out)
    files = {"fp32": graphs.save_model(merged, staging / "model.onnx")}
    if "int8" in variants:
        files["int8"] = graphs.quantize_int8(staging / "model.onnx", staging / "model.int8.onnx",
                                             exclude_nodes=graphs.lm_head_nodes(merged, config.vocab_size))
    if "fp16" in variants:
        half, n = graphs.mixed_precision(merged, "float16")
        files["fp16"] = graphs.save_model(half, staging / "model.fp16.onnx")
        log.info("fp16 variant: %d matmuls in fp16; feed-forward output, norms, residuals in fp32", n)
    opset_version = next(o.version for o in merged.opset_import if o.domain in ("", "ai.onnx"))
    del merged
    _save_tokenizer(tokenizer.backend_tokenizer, staging / "tokenizer.json")

    fields = {
        "kind": "askllm",
        "backend": "seq2seq",
        "name": name or _display_name(model),
        "source": _source(model, revision, "transformers", getattr(config, "_commit_hash", None)),
        "variants": {v: {"model": f[0], "external_data": f[1:], **_variant_notes(v)} for v, f in files.items()},
        "tokenizer": "tokenizer.json",
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
            "output": {"name": graphs.ASKLLM_OUTPUT, "shape": ["batch", 2], "meaning": "log P(yes), log P(no) over the full vocabulary"},
        },
        "dtype": "float32",
        "opset": opset_version,
        "exporter": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(staging, fields, [f for fs in files.values() for f in fs] + ["tokenizer.json"])
    if validate:
        _checked(staging, lambda: _validate_askllm(model, revision, staging, max_tokens))
    _publish(staging, out)
    log.info("exported askllm %s to %s in %.1f s", model, out, time.monotonic() - t0)
    return out


def export_embedder(
    model: str,
    out: str | Path,
    *,
    revision: str | None = None,
    name: str | None = None,
    variants: Sequence[str] = EMBEDDER_VARIANTS,
    opset: int | None = None,
    validate: bool = True,
) -> Path:
    """Export a sentence-transformers model as an embedder folder (pooling, Dense, Normalize in the graph)."""
    _require_export_extra()
    from optimum.exporters.onnx import main_export
    from sentence_transformers import SentenceTransformer
    import onnx

    from streamfilter.models import graphs

    check_variants(variants, EMBEDDER_VARIANTS)
    out = Path(out)
    t0 = time.monotonic()
    st = SentenceTransformer(model, device="cpu", revision=revision)
    modules, pooling, dense = _read_modules(st)
    transformer = st[0]
    dim = dense[-1].weight.shape[0] if dense else st.get_embedding_dimension()
    with tempfile.TemporaryDirectory(prefix="streamfilter-export-") as tmp:
        main_export(model, tmp, task="feature-extraction", revision=revision or "main", opset=opset,
                    library_name="sentence_transformers", do_validation=False)
        exported = onnx.load(str(Path(tmp) / "model.onnx"))
    # Whatever the exporter did after the transformer (it may drop Dense), we rebuild the
    # head from the module list on its token embeddings.
    head = graphs.embedder_graph(exported, token_output="token_embeddings", pooling_modes=pooling, dense=dense)
    del exported
    staging = _staging_dir(out)
    files = {"fp32": graphs.save_model(head, staging / "model.onnx")}
    if "int8" in variants:
        files["int8"] = graphs.quantize_int8(staging / "model.onnx", staging / "model.int8.onnx")
    opset_version = next(o.version for o in head.opset_import if o.domain in ("", "ai.onnx"))
    del head
    _save_tokenizer(transformer.tokenizer.backend_tokenizer, staging / "tokenizer.json")
    do_lower_case = bool(getattr(transformer, "do_lower_case", False))
    pad_id = transformer.tokenizer.pad_token_id if transformer.tokenizer.pad_token_id is not None else 0
    fields = {
        "kind": "embedder",
        "name": name or _display_name(model),
        "source": _source(model, revision, "sentence_transformers", None),
        "variants": {v: {"model": f[0], "external_data": f[1:]} for v, f in files.items()},
        "tokenizer": "tokenizer.json",
        "config": {
            "dim": int(dim),
            "max_seq_length": int(st.max_seq_length),
            "do_lower_case": do_lower_case,
            "pad_token_id": int(pad_id),
            "modules": modules,
            "pooling_modes": list(pooling),
            "dense_layers": [{"in": int(d.weight.shape[1]), "out": int(d.weight.shape[0]), "bias": d.bias is not None,
                              "activation": d.activation} for d in dense],
            "normalize": True,
            "output": {"name": graphs.EMBEDDER_OUTPUT, "shape": ["batch", int(dim)], "meaning": "L2-normalised embedding"},
        },
        "dtype": "float32",
        "opset": opset_version,
        "exporter": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(staging, fields, [f for fs in files.values() for f in fs] + ["tokenizer.json"])
    if validate:
        _checked(staging, lambda: _validate_embedder(st, staging))
    _publish(staging, out)
    log.info("exported embedder %s to %s in %.1f s", model, out, time.monotonic() - t0)
    return out


def _read_modules(st) -> tuple[list[dict], list[str], list]:
    """The sentence-transformers module list as (summary, pooling modes, Dense layers).

    Refuses modules it cannot reproduce instead of exporting a model that silently differs.
    """
    from streamfilter.models.graphs import POOLING_MODES, DenseLayer

    summary, pooling, dense = [], [], []
    for idx, module in enumerate(st):
        kind = type(module).__name__
        summary.append({"idx": idx, "type": kind})
        if idx == 0:
            if kind != "Transformer":
                raise UserError(f"sentence-transformers module 0 is {kind}, expected Transformer")
            continue
        if kind == "Pooling":
            cfg = module.get_config_dict()
            modes = _pooling_modes(cfg)
            if not modes or any(m not in POOLING_MODES for m in modes):
                raise UserError(f"pooling {cfg} is not supported (supported: {', '.join(POOLING_MODES)})")
            pooling = [m for m in POOLING_MODES if m in modes]
            summary[-1]["pooling_modes"] = pooling
        elif kind == "Dense":
            if not pooling:
                raise UserError("a Dense module before Pooling is not supported")
            act = type(module.activation_function).__name__.lower()
            if act not in ("identity", "tanh"):
                raise UserError(f"Dense activation {act!r} is not supported (identity, tanh)")
            weight = module.linear.weight.detach().float().cpu().numpy()
            bias = module.linear.bias.detach().float().cpu().numpy() if module.linear.bias is not None else None
            dense.append(DenseLayer(weight=weight, bias=bias, activation=act))
            summary[-1].update({"in": int(weight.shape[1]), "out": int(weight.shape[0]), "bias": bias is not None})
        elif kind == "Normalize":
            pass  # always applied
        else:
            raise UserError(f"sentence-transformers module {kind} is not supported (Transformer, Pooling, Dense, Normalize)")
    if not pooling:
        raise UserError("the sentence-transformers model has no Pooling module")
    return summary, pooling, dense


def _pooling_modes(cfg: dict) -> list[str]:
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):  # sentence-transformers >= 5.x
        return [{"mean_sqrt_len": "mean_sqrt_len_tokens"}.get(mode, mode)]
    if isinstance(mode, (list, tuple)):
        return [{"mean_sqrt_len": "mean_sqrt_len_tokens"}.get(m, m) for m in mode]
    flags = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
             "pooling_mode_lasttoken": "lasttoken"}
    return [m for k, m in flags.items() if cfg.get(k)]


def _is_causal_lm(config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"tokenizer: {word!r} is {len(ids)} tokens ({ids}); Ask-LLM needs it to be one token")
    return int(ids[0])


def _display_name(model: str) -> str:
    return Path(model.rstrip("/")).name


def _variant_notes(variant: str) -> dict:
    return {
        "fp32": {"device": "any"},
        "int8": {"device": "cpu", "note": "dynamic int8 quantization of weight matmuls; LM head kept fp32"},
        "fp16": {"device": "gpu", "note": "fp16 attention/FFN-input matmuls; FFN output, norms, residuals fp32"},
    }[variant]


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def _publish(staging: Path, out: Path) -> None:
    """Replace `out` with `staging` (readers never see a half-written folder with a manifest)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


# --- validation against the PyTorch reference ---------------------------------------------

def _checked(staging: Path, check) -> None:
    """Run `check`; on failure the staging folder is removed, so no validated-looking folder remains."""
    try:
        check()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _validate_askllm(model: str, revision: str | None, folder: Path, max_tokens: int) -> None:
    from streamfilter.models import reference
    from streamfilter.models.askllm import AskLLMScorer

    scorer = AskLLMScorer.load(folder, variant="fp32", max_tokens=max_tokens)
    ref = reference.TorchAskLLM.load(model, revision=revision)
    ours = scorer.log_probs(list(VALIDATION_TEXTS), batch_size=4)[:, 0]
    theirs = ref.log_p_yes([make_prompt(t) for t in VALIDATION_TEXTS], max_tokens=max_tokens)
    err = float(np.max(np.abs(np.exp(ours) - np.exp(theirs))))
    if err > 1e-4:
        raise UserError(f"export check failed: ONNX P(yes) differs from PyTorch by {err:.2e} (> 1e-4)")
    log.info("export check: max |ΔP(yes)| vs PyTorch = %.1e", err)


def _validate_embedder(st, folder: Path) -> None:
    from streamfilter.models.embedder import SentenceEmbedder

    ours = SentenceEmbedder.load(folder, variant="fp32").embed(list(VALIDATION_TEXTS))
    ref = st.encode(list(VALIDATION_TEXTS), convert_to_numpy=True, normalize_embeddings=True)
    cos = float(np.min(np.sum(ours * ref, axis=1)))
    if cos < 0.9999:
        raise UserError(f"export check failed: cosine to sentence-transformers' encode is {cos:.6f} (< 0.9999)")
    log.info("export check: min cosine vs sentence-transformers = %.6f", cos)
