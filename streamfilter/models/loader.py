"""One entry point from a model folder to the class that runs it, chosen by the manifest's `kind` and `backend`.

    load_model("onnx_models/flan-t5-small", kind="askllm", max_tokens=512)   # an AskLLMScorer
    load_model("onnx_models/qwen-askllm", kind="askllm")                     # a CausalAskLLMScorer
    load_model("onnx_models/sentence-t5-base", kind="embedder", dtype="float16")

Every class here checks that it was given its own kind and backend, and none returns another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence, overload

from streamfilter.errors import UserError
from streamfilter.models.askllm import AskLLMScorer
from streamfilter.models.askllm_causal import CausalAskLLMScorer
from streamfilter.models.base import OnnxTextModel
from streamfilter.models.embedder import SentenceEmbedder
from streamfilter.models.manifest import Manifest, load_manifest
from streamfilter.models.perplexity import PerplexityScorer

# (kind, backend or None for any) -> the class that runs it; the first match wins.
MODEL_CLASSES: tuple[type[OnnxTextModel], ...] = (AskLLMScorer, CausalAskLLMScorer, PerplexityScorer, SentenceEmbedder)


def model_class(manifest: Manifest) -> type[OnnxTextModel]:
    """The class that runs the folder of `manifest` (UserError if none does)."""
    for cls in MODEL_CLASSES:
        if cls.KIND == manifest.kind and cls.BACKEND in (None, manifest.backend):
            return cls
    raise UserError(f"{manifest.root}: no runtime for a {manifest.kind!r} model with backend {manifest.backend!r}")


@overload
def load_model(model_dir: str | Path, *, kind: Literal["askllm"], variant: str | None = ...,
               providers: Sequence[str] | None = ..., intra_op_threads: int | None = ...,
               **options: Any) -> AskLLMScorer: ...


@overload
def load_model(model_dir: str | Path, *, kind: Literal["embedder"], variant: str | None = ...,
               providers: Sequence[str] | None = ..., intra_op_threads: int | None = ...,
               **options: Any) -> SentenceEmbedder: ...


@overload
def load_model(model_dir: str | Path, *, kind: Literal["perplexity"], variant: str | None = ...,
               providers: Sequence[str] | None = ..., intra_op_threads: int | None = ...,
               **options: Any) -> PerplexityScorer: ...


@overload
def load_model(model_dir: str | Path, *, kind: None = ..., variant: str | None = ...,
               providers: Sequence[str] | None = ..., intra_op_threads: int | None = ...,
               **options: Any) -> OnnxTextModel: ...


def load_model(model_dir: str | Path, *, kind: str | None = None, variant: str | None = None,
               providers: Sequence[str] | None = None, intra_op_threads: int | None = None,
               **options: Any) -> OnnxTextModel:
    """Load an exported model folder with the class its manifest names, every file checked against it.

    `kind`: the kind the caller expects ("askllm", "embedder", "perplexity"; UserError if the
    folder holds another), or None for whatever it holds. `options` go to the class:
    `max_tokens` (Ask-LLM, perplexity: default 512; embedder: default the model's
    `max_seq_length`) and `dtype` (embedder: "float32" or "float16"). `variant`, `batch_tokens`
    and `workers`: see `OnnxTextModel.load` and `OnnxTextModel.open`.
    """
    manifest = load_manifest(model_dir, kind=kind)
    return model_class(manifest).open(manifest, variant=variant, providers=providers,
                                      intra_op_threads=intra_op_threads, **options)
