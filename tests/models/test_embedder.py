"""Sentence embeddings on ONNX Runtime against sentence-transformers' own `encode`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from streamfilter.corpus import wiki_documents
from streamfilter.models import SentenceEmbedder


@pytest.fixture(scope="module")
def st5(test_models):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(test_models.sentence_t5_source), device="cpu")


@pytest.fixture(scope="module")
def minilm_st(test_models):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(test_models.minilm_source), device="cpu")


def _texts():
    # Includes documents longer than max_seq_length (256), which both sides truncate.
    return [d.text for d in wiki_documents()[20:44]] + [wiki_documents()[3].text * 5, "  padded  ", "x"]


def test_sentence_t5_matches_sentence_transformers_including_dense(test_models, st5):
    emb = SentenceEmbedder.load(test_models.sentence_t5, variant="fp32")
    texts = _texts()
    ours = emb.embed(texts, batch_size=8)
    ref = st5.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    assert ours.shape == (len(texts), emb.dim) and ours.dtype == np.float32
    assert np.min(np.sum(ours * ref, axis=1)) >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_the_dense_layer_matters(test_models, st5):
    """Without 2_Dense (what several exporters produce) the embeddings are far off: the parity test can tell."""
    graph = onnx.load(str(test_models.sentence_t5 / "model.onnx")).graph
    assert any(n.op_type == "MatMul" and "head/dense0/weight_t" in n.input for n in graph.node)
    texts = _texts()[:8]
    tokens = st5.encode(texts, output_value="token_embeddings")
    no_dense = np.stack([t.numpy().mean(0) for t in tokens])
    no_dense /= np.linalg.norm(no_dense, axis=1, keepdims=True)
    ref = st5.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    assert np.max(np.sum(no_dense * ref, axis=1)) < 0.99


def test_minilm_matches_sentence_transformers(test_models, minilm_st):
    emb = SentenceEmbedder.load(test_models.minilm, variant="fp32")
    texts = _texts()
    ours = emb.embed(texts, batch_size=8)
    ref = minilm_st.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    assert emb.dim == 384
    assert np.min(np.sum(ours * ref, axis=1)) >= 0.9999


def test_minilm_int8_cosine_to_fp32(test_models, record_property):
    texts = [d.text for d in wiki_documents()[:200]]
    fp32 = SentenceEmbedder.load(test_models.minilm, variant="fp32").embed(texts)
    int8 = SentenceEmbedder.load(test_models.minilm, variant="int8").embed(texts)
    cos = np.sum(fp32 * int8, axis=1)
    record_property("minilm_int8_cosine_mean", round(float(cos.mean()), 4))
    print(f"MiniLM int8 vs fp32 cosine on 200 Wikipedia summaries: mean {cos.mean():.4f}, min {cos.min():.4f}")
    assert cos.mean() > 0.95


def test_float16_output_and_batch_independence(test_models):
    emb = SentenceEmbedder.load(test_models.minilm, dtype="float16", variant="fp32")
    texts = ["short", wiki_documents()[1].text * 3, "a medium sized sentence about cats"]
    batched = emb.embed(texts, batch_size=3)
    alone = np.concatenate([emb.embed([t]) for t in texts])
    assert batched.dtype == np.float16
    np.testing.assert_allclose(batched.astype(np.float32), alone.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(batched.astype(np.float32), axis=1), 1.0, atol=2e-3)


@pytest.mark.parametrize("text", ["", "\ud800", " " * 100, "y" * 10_000_000])
def test_odd_text_gets_a_unit_vector(test_models, text):
    emb = SentenceEmbedder.load(test_models.sentence_t5, variant="fp32")
    (vec,) = emb.embed([text])
    assert np.all(np.isfinite(vec)) and abs(np.linalg.norm(vec) - 1.0) < 1e-4
