"""Export a sentence-transformers model as an embedder folder, through optimum's ONNX exporter.

optimum's `feature-extraction` export of the transformer, then the head rebuilt from the
model's own module list (`graphs.heads.embedder_graph`: pooling, Dense, Normalize; exporters
may drop Dense silently), with an int8 variant. The fp32 graph is checked against
sentence-transformers' `encode` before the folder is published.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from streamfilter.errors import UserError
from streamfilter.models.export.common import (TOKENIZER_FILE, VALIDATION_TEXTS, check_variants, created_at,
                                               display_name, manifest_variants, optimum_export, publish,
                                               require_export_extra, save_tokenizer, source_fields, staging_dir,
                                               versions)

log = logging.getLogger(__name__)

EMBEDDER_VARIANTS = ("fp32", "int8")


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
    require_export_extra()
    from sentence_transformers import SentenceTransformer
    import onnx

    from streamfilter.models.graphs import edit, heads, quantize

    check_variants(variants, EMBEDDER_VARIANTS)
    out = Path(out)
    t0 = time.monotonic()
    st = SentenceTransformer(model, device="cpu", revision=revision)
    modules, pooling, dense = _read_modules(st)
    transformer = st[0]
    dim = dense[-1].weight.shape[0] if dense else st.get_embedding_dimension()
    with tempfile.TemporaryDirectory(prefix="streamfilter-export-") as tmp:
        optimum_export(model, tmp, task="feature-extraction", revision=revision, opset=opset,
                       library_name="sentence_transformers")
        exported = onnx.load(str(Path(tmp) / "model.onnx"))
    # Whatever the exporter did after the transformer (it may drop Dense), we rebuild the
    # head from the module list on its token embeddings.
    head = heads.embedder_graph(exported, token_output="token_embeddings", pooling_modes=pooling, dense=dense)
    del exported
    staging = staging_dir(out)
    files = {"fp32": edit.save_model(head, staging / "model.onnx")}
    if "int8" in variants:
        files["int8"] = quantize.quantize_int8(staging / "model.onnx", staging / "model.int8.onnx")
    opset_version = edit.opset_version(head)
    del head
    save_tokenizer(transformer.tokenizer.backend_tokenizer, staging / TOKENIZER_FILE)
    do_lower_case = bool(getattr(transformer, "do_lower_case", False))
    pad_id = transformer.tokenizer.pad_token_id if transformer.tokenizer.pad_token_id is not None else 0
    fields = {
        "kind": "embedder",
        "name": name or display_name(model),
        "source": source_fields(model, revision, "sentence_transformers", None),
        "variants": manifest_variants(files),
        "tokenizer": TOKENIZER_FILE,
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
            "output": {"name": heads.EMBEDDER_OUTPUT, "shape": ["batch", int(dim)], "meaning": "L2-normalised embedding"},
        },
        "dtype": "float32",
        "opset": opset_version,
        "exporter": versions(),
        "created_at": created_at(),
    }
    publish(staging, out, fields, files, (lambda: _validate(st, staging)) if validate else None)
    log.info("exported embedder %s to %s in %.1f s", model, out, time.monotonic() - t0)
    return out


def _read_modules(st) -> tuple[list[dict], list[str], list]:
    """The sentence-transformers module list as (summary, pooling modes, Dense layers).

    Refuses modules it cannot reproduce instead of exporting a model that silently differs.
    """
    from streamfilter.models.graphs.heads import POOLING_MODES, DenseLayer

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


def _validate(st, folder: Path) -> None:
    """The fp32 graph's embeddings against sentence-transformers' `encode`: cosine at least 0.9999."""
    from streamfilter.models.embedder import SentenceEmbedder

    ours = SentenceEmbedder.load(folder, variant="fp32").embed(list(VALIDATION_TEXTS))
    ref = st.encode(list(VALIDATION_TEXTS), convert_to_numpy=True, normalize_embeddings=True)
    cos = float(np.min(np.sum(ours * ref, axis=1)))
    if cos < 0.9999:
        raise UserError(f"export check failed: cosine to sentence-transformers' encode is {cos:.6f} (< 0.9999)")
    log.info("export check: min cosine vs sentence-transformers = %.6f", cos)
