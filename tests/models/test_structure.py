"""How `streamfilter.models` is put together: no import cycle among its modules, and one loader that
picks the class a model folder's manifest names (`kind`, `backend`), each class running only its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import streamfilter.models

MODELS = Path(streamfilter.models.__file__).resolve().parent
PACKAGE = "streamfilter.models"


def model_modules() -> dict[str, Path]:
    """{dotted name: file} of every module under streamfilter/models/ (packages by their __init__.py)."""
    found = {}
    for path in sorted(MODELS.rglob("*.py")):
        parts = path.relative_to(MODELS).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((PACKAGE, *parts))] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports anywhere in its source: at the top, inside functions,
    under TYPE_CHECKING, and (for a package's lazy `__getattr__`) named as strings."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    out.add(f"{source}.{alias.name}")  # `from streamfilter.models.graphs import heads`
                elif source in known:
                    out.add(source)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            out.add(node.value)  # importlib.import_module("streamfilter.models.askllm")
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = model_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


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
