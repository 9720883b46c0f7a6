"""How `streamfilter.models` is put together: no import cycle among its modules, and one loader that
picks the class a model folder's manifest names (`kind`, `backend`), each class running only its own."""

from __future__ import annotations

import pytest
from import_graph import find_cycle, graph

PACKAGE = "streamfilter.models"


def import_graph() -> dict[str, set[str]]:
    return graph(PACKAGE)


def test_the_import_walk_sees_function_level_and_lazy_imports():
    edges = import_graph()
    assert {"streamfilter.models.export", "streamfilter.models.graphs.heads",
            "streamfilter.models.graphs.quantize"} <= set(edges)
    assert "streamfilter.models.runtime" in edges["streamfilter.models.base"]  # imported inside `open`
    assert "streamfilter.models.loader" in edges["streamfilter.models"]  # the lazy __getattr__ table
    assert "streamfilter.models.export.causal" in edges["streamfilter.models.export"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_the_model_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_runtime_modules_import_nothing_of_the_export_side():
    export_side = ("streamfilter.models.export", "streamfilter.models.graphs", "streamfilter.models.reference",
                   "streamfilter.models.testmodels")
    edges = import_graph()
    for name in ("loader", "base", "scorer", "askllm", "askllm_causal", "perplexity", "embedder", "runtime",
                 "manifest", "text"):
        module = f"{PACKAGE}.{name}"
        assert not {m for m in edges[module] if m.startswith(export_side)}, module


@pytest.fixture(scope="module")
def loaded(test_models, causal_models):
    from streamfilter.models import load_model

    return {
        "askllm seq2seq": load_model(test_models.askllm, variant="fp32"),
        "askllm causal": load_model(causal_models.askllm, variant="fp32"),
        "perplexity": load_model(causal_models.perplexity, variant="fp32"),
        "embedder": load_model(test_models.minilm, variant="fp32"),
    }


def test_the_loader_returns_the_class_of_each_manifest_kind_and_backend(loaded):
    from streamfilter.models import (AskLLMScorer, CausalAskLLMScorer, Embedder, PerplexityModel, PerplexityScorer,
                                     QualityScorer, SentenceEmbedder)

    assert {what: type(model) for what, model in loaded.items()} == {
        "askllm seq2seq": AskLLMScorer, "askllm causal": CausalAskLLMScorer,
        "perplexity": PerplexityScorer, "embedder": SentenceEmbedder}
    assert [m.backend for m in (loaded["askllm seq2seq"], loaded["askllm causal"])] == ["seq2seq", "causal"]
    # what the score stage depends on
    assert isinstance(loaded["askllm seq2seq"], QualityScorer) and isinstance(loaded["askllm causal"], QualityScorer)
    assert isinstance(loaded["embedder"], Embedder) and isinstance(loaded["perplexity"], PerplexityModel)
    assert not hasattr(loaded["perplexity"], "score")  # its signal is mean_nll, under its own name


def test_each_class_loads_only_its_own_kind_and_backend(test_models, causal_models):
    from streamfilter.errors import UserError
    from streamfilter.models import AskLLMScorer, CausalAskLLMScorer, PerplexityScorer, SentenceEmbedder, load_model

    assert type(AskLLMScorer.load(test_models.askllm, variant="fp32")) is AskLLMScorer
    assert type(CausalAskLLMScorer.load(causal_models.askllm, variant="fp32")) is CausalAskLLMScorer
    with pytest.raises(UserError, match="holds a 'causal' askllm model, which AskLLMScorer does not run"):
        AskLLMScorer.load(causal_models.askllm)
    with pytest.raises(UserError, match="holds a 'seq2seq' askllm model, which CausalAskLLMScorer does not run"):
        CausalAskLLMScorer.load(test_models.askllm)
    with pytest.raises(UserError, match="holds a 'askllm' model, not an 'perplexity' model"):
        PerplexityScorer.load(causal_models.askllm)
    with pytest.raises(UserError, match="holds a 'perplexity' model, not an 'embedder' model"):
        SentenceEmbedder.load(causal_models.perplexity)
    with pytest.raises(UserError, match="not an 'embedder' model"):
        load_model(test_models.askllm, kind="embedder")


def test_loader_options_reach_the_class(test_models, causal_models):
    from streamfilter.models import load_model

    emb = load_model(test_models.minilm, kind="embedder", dtype="float16", variant="fp32")
    assert emb.embed(["a text"]).dtype.name == "float16" and emb.max_tokens == emb.manifest.config["max_seq_length"]
    assert load_model(test_models.askllm, kind="askllm", max_tokens=128, variant="fp32").max_tokens == 128
    assert load_model(causal_models.perplexity, max_tokens=64, variant="fp32").max_tokens == 64
