"""Offline models for the model tests, built once into a cache (see `ensure_test_models`).

The cache is `<repo>/.cache/test-models` unless STREAMFILTER_TEST_MODELS_DIR names
another folder. The first session builds it (~30 s on 2 cores); later ones verify the
manifests only.
"""

from __future__ import annotations

import os

import pytest

from streamfilter.corpus import junk_documents, wiki_documents


@pytest.fixture(scope="session")
def test_models():
    from streamfilter.models.testmodels import ensure_test_models

    return ensure_test_models(os.environ.get("STREAMFILTER_TEST_MODELS_DIR"))


@pytest.fixture(scope="session")
def askllm(test_models):
    from streamfilter.models import AskLLMScorer

    return AskLLMScorer.load(test_models.askllm, variant="fp32")


@pytest.fixture(scope="session")
def askllm_int8(test_models):
    from streamfilter.models import AskLLMScorer

    return AskLLMScorer.load(test_models.askllm, variant="int8")


@pytest.fixture(scope="session")
def torch_askllm(test_models):
    from streamfilter.models.reference import TorchAskLLM

    return TorchAskLLM.load(str(test_models.askllm_source))


@pytest.fixture(scope="session")
def sample_texts():
    """Real and junk documents of varied length (all fit in a 512-token prompt)."""
    wiki = [d.text for d in wiki_documents()[:16]]
    junk = [d.text for d in junk_documents(8, seed=3)]
    return wiki + junk + ["Short.", "Paris is the capital of France."]


@pytest.fixture(scope="session")
def causal_models():
    from streamfilter.models.testmodels import ensure_causal_test_models

    return ensure_causal_test_models(os.environ.get("STREAMFILTER_TEST_MODELS_DIR"))


@pytest.fixture(scope="session")
def causal_askllm(causal_models):
    from streamfilter.models import load_model

    return load_model(causal_models.askllm, kind="askllm", variant="fp32")


@pytest.fixture(scope="session")
def torch_causal(causal_models):
    from streamfilter.models.reference import TorchCausalLM

    return TorchCausalLM.load(str(causal_models.source))
