"""The paper's two model signals on ONNX Runtime: Ask-LLM (quality) and Sentence-T5 (embeddings).

Runtime path (`askllm`, `embedder`, `runtime`, `manifest`, `text`) needs only numpy,
onnxruntime and tokenizers. Exporting (`export`, `graphs`, `testmodels`, `reference`)
needs the `export` extra (torch, transformers, optimum, sentence-transformers, onnx).

Names are resolved lazily so that `import streamfilter.models` (done by the CLI) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AskLLMScorer", "CausalAskLLMScorer", "PerplexityScorer", "SentenceEmbedder", "Manifest", "load_manifest",
           "ensure_test_models", "ensure_causal_test_models"]

_LAZY = {
    "AskLLMScorer": "streamfilter.models.askllm",
    "SentenceEmbedder": "streamfilter.models.embedder",
    "Manifest": "streamfilter.models.manifest",
    "load_manifest": "streamfilter.models.manifest",
    "ensure_test_models": "streamfilter.models.testmodels",
    "ensure_causal_test_models": "streamfilter.models.testmodels",
    "CausalAskLLMScorer": "streamfilter.models.askllm_causal",
    "PerplexityScorer": "streamfilter.models.perplexity",
}

if TYPE_CHECKING:  # pragma: no cover
    from streamfilter.models.askllm import AskLLMScorer
    from streamfilter.models.embedder import SentenceEmbedder
    from streamfilter.models.manifest import Manifest, load_manifest
    from streamfilter.models.testmodels import ensure_test_models


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamfilter.models' has no attribute {name!r}")
