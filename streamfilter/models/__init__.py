"""The paper's model signals on ONNX Runtime: Ask-LLM (quality), Sentence-T5 (embeddings), perplexity.

Runtime path (`loader`, `base`, `askllm`, `askllm_causal`, `perplexity`, `embedder`, `runtime`,
`manifest`, `text`, and `scorer`: the protocols the score stage depends on) needs only numpy,
onnxruntime and tokenizers. Exporting (`export`, `graphs`, `testmodels`, `reference`) needs
the `export` extra (torch, transformers, optimum, sentence-transformers, onnx).

`load_model(folder)` reads the folder's manifest and returns the class that runs it.
Names are resolved lazily so that `import streamfilter.models` (done by the CLI) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["load_model", "AskLLMScorer", "CausalAskLLMScorer", "PerplexityScorer", "SentenceEmbedder",
           "OnnxTextModel", "QualityScorer", "Embedder", "PerplexityModel", "Manifest", "load_manifest",
           "ensure_test_models", "ensure_causal_test_models"]

_LAZY = {
    "load_model": "streamfilter.models.loader",
    "AskLLMScorer": "streamfilter.models.askllm",
    "CausalAskLLMScorer": "streamfilter.models.askllm_causal",
    "PerplexityScorer": "streamfilter.models.perplexity",
    "SentenceEmbedder": "streamfilter.models.embedder",
    "OnnxTextModel": "streamfilter.models.base",
    "QualityScorer": "streamfilter.models.scorer",
    "Embedder": "streamfilter.models.scorer",
    "PerplexityModel": "streamfilter.models.scorer",
    "Manifest": "streamfilter.models.manifest",
    "load_manifest": "streamfilter.models.manifest",
    "ensure_test_models": "streamfilter.models.testmodels",
    "ensure_causal_test_models": "streamfilter.models.testmodels",
}

if TYPE_CHECKING:  # pragma: no cover
    from streamfilter.models.askllm import AskLLMScorer
    from streamfilter.models.askllm_causal import CausalAskLLMScorer
    from streamfilter.models.base import OnnxTextModel
    from streamfilter.models.embedder import SentenceEmbedder
    from streamfilter.models.loader import load_model
    from streamfilter.models.manifest import Manifest, load_manifest
    from streamfilter.models.perplexity import PerplexityScorer
    from streamfilter.models.scorer import Embedder, PerplexityModel, QualityScorer
    from streamfilter.models.testmodels import ensure_causal_test_models, ensure_test_models


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamfilter.models' has no attribute {name!r}")
